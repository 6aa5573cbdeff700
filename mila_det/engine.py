"""Training-loop pieces MMEngine lacks: bf16 autocast on CPU, checkpoints
between the per-epoch ones, and a resume that continues exactly where a
killed run stopped, also in the middle of an epoch.

How a resumed run matches an uninterrupted one:

* ``IterCheckpointHook`` saves ``iter_<n>.pth`` every ``interval``
  iterations beside MMEngine's per-epoch ``epoch_<e>.pth`` and points
  ``last_checkpoint`` at it, so ``tools/train.py --resume`` picks the newest
  of the two kinds.
* ``ResumableEpochBasedTrainLoop`` works out from the checkpoint's
  ``(epoch, iter)`` how many batches of the current epoch were trained,
  draws that epoch's batch order again (the sampler's order depends only on
  its seed and the epoch) and drops those batches before any image is read.
* The same loop reseeds Python, NumPy and torch before fetching each batch
  from ``(seed, iteration)``, so the augmentations and drop-path masks of
  iteration ``n`` do not depend on where the run started.
"""
import itertools
import random
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from mmdet.registry import DATA_SAMPLERS, HOOKS, LOOPS, OPTIM_WRAPPERS
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.runner import EpochBasedTrainLoop
from torch.utils.data import BatchSampler, DataLoader, Sampler

from .datasets.robust import SkipBadSamples
from .hooks import save_checkpoint_then_prune


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """Mixed precision on CPU: bfloat16 autocast (no loss scaling needed:
    bf16 has fp32's range).

    MMEngine's ``AmpOptimWrapper`` only runs on accelerators, so
    ``tools/train.py --amp`` picks this one when no GPU is present. Autocast
    covers the detector's ``extract_feat`` (backbone and neck, where nearly
    all FLOPs are); the heads stay fp32 because mmcv's CPU ops (nms,
    RoIAlign) accept fp32 only. mila_det's operators keep their sums and
    normalisers in fp32 inside autocast regions.
    """

    def __init__(self, *args, dtype: str = 'bfloat16', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cast_dtype = getattr(torch, dtype)

    @contextmanager
    def optim_context(self, model):
        target = model.module if is_model_wrapper(model) else model
        extract = getattr(target, 'extract_feat', None)
        if extract is None:  # not a detector: autocast everything
            with super().optim_context(model), torch.autocast(
                    'cpu', dtype=self.cast_dtype):
                yield
            return

        def extract_feat(*args, **kwargs):
            with torch.autocast('cpu', dtype=self.cast_dtype):
                feats = extract(*args, **kwargs)
            return tuple(f.float() for f in feats)

        target.extract_feat = extract_feat
        try:
            with super().optim_context(model):
                yield
        finally:
            del target.extract_feat  # back to the class's method


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and
    every CUDA device) with one value."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def iteration_seed(base_seed: int, iteration: int) -> int:
    """The seed of one training iteration: a 32-bit value mixed from the
    run's seed and the iteration's index (NumPy's ``SeedSequence``), so
    neighbouring iterations get unrelated streams.

    Args:
        base_seed (int): The run's seed (``runner.seed``; it already holds
            the rank when ``randomness.diff_rank_seed`` is set).
        iteration (int): Index of the iteration, counted from the start of
            training (``runner.iter``).

    Returns:
        int: A seed in ``[0, 2**32)``.
    """
    entropy = (int(base_seed) % (1 << 64), int(iteration))
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Reseed Python, NumPy and torch at the start of every training epoch
    from ``(seed, epoch)``.

    MMEngine's checkpoints do not hold random-number states, so a run
    resumed after a kill would draw different augmentations and drop-path
    masks than the run it continues. With this hook each epoch's random
    stream depends only on the seed and the epoch, so a run resumed from an
    epoch checkpoint ends exactly where an uninterrupted one does (on CPU,
    with ``randomness=dict(seed=..., deterministic=True)``).

    ``ResumableEpochBasedTrainLoop`` (every config in ``configs/``) reseeds
    before every iteration, which covers resuming inside an epoch too and
    makes this hook redundant; it stays for configs that keep MMEngine's
    ``EpochBasedTrainLoop``.

    Args:
        seed (int, optional): Base seed. Defaults to the runner's seed.
    """
    priority = 'VERY_HIGH'

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = seed

    def before_train_epoch(self, runner) -> None:
        base = self.seed if self.seed is not None else runner.seed
        seed_everything((int(base) * 1_000_003 + runner.epoch) % (2**31))


@HOOKS.register_module()
class IterCheckpointHook(Hook):
    """Save a resumable checkpoint every ``interval`` training iterations,
    alongside the per-epoch ones of MMEngine's ``CheckpointHook``.

    The file, ``<work_dir>/iter_<n>.pth`` after ``n`` iterations, holds what
    an epoch checkpoint holds: weights, optimizer and parameter-scheduler
    states, the message hub (log history) and ``meta`` with
    ``epoch`` = the epoch under way and ``iter`` = ``n``. It is then named
    in ``<work_dir>/last_checkpoint``, which ``--resume`` without a path
    reads, so a killed run restarts from whichever checkpoint, epoch or
    iteration, was written last. Only the newest ``max_keep_ckpts``
    iteration checkpoints are kept (the list survives a resume through the
    message hub); epoch checkpoints are left to ``CheckpointHook``. The
    file and ``last_checkpoint`` are written atomically (temporary name,
    fsync, rename; see :func:`~mila_det.hooks.save_checkpoint_atomically`)
    and the older files are removed only after the new one is complete.

    Resuming from an iteration checkpoint continues mid-epoch only under
    ``ResumableEpochBasedTrainLoop``; MMEngine's ``EpochBasedTrainLoop``
    would start that epoch's data again from its first batch.

    Args:
        interval (int): Save after every ``interval`` iterations, counted
            from the start of training.
        max_keep_ckpts (int): How many iteration checkpoints to keep, the
            newest; 0 or less keeps all. Defaults to 2.
    """
    priority = 'VERY_LOW'  # after the schedulers stepped and the log updated
    info_key = 'iter_ckpt_ids'

    def __init__(self, interval: int, max_keep_ckpts: int = 2) -> None:
        if interval < 1:
            raise ValueError(f'interval must be at least 1, got {interval}')
        self.interval = interval
        self.max_keep_ckpts = max_keep_ckpts

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Optional[Union[dict, tuple, list]] = None,
                         outputs: Optional[dict] = None) -> None:
        done = runner.iter + 1  # iterations finished, this one included
        if done % self.interval:
            return
        kept: List[int] = list(runner.message_hub.get_info(self.info_key, []))
        if done not in kept:
            kept.append(done)
        stale: List[int] = []
        if self.max_keep_ckpts > 0:
            stale = kept[:-self.max_keep_ckpts]
            kept = kept[-self.max_keep_ckpts:]
        # recorded before saving, so the checkpoint lists itself
        runner.message_hub.update_info(self.info_key, kept)
        filename = f'iter_{done}.pth'
        runner.logger.info(f'Saving iteration checkpoint {filename}')
        save_checkpoint_then_prune(runner, runner.work_dir, filename,
                                   [f'iter_{step}.pth' for step in stale],
                                   by_epoch=False)


@DATA_SAMPLERS.register_module()
class ResumableBatchSampler(Sampler):
    """A batch sampler whose next pass can start after its first batches.

    Wraps the batch sampler a config names (MMDetection's
    ``AspectRatioBatchSampler`` in the COCO configs) or, when it names none,
    plain fixed-size batches. While ``skip`` is ``k``, a pass draws the
    epoch's batches exactly as a full pass would and drops the first ``k``:
    only indices are drawn, no image is read. ``skip`` is 0 (full passes)
    except while ``ResumableEpochBasedTrainLoop``, which puts this wrapper
    in place itself, starts the first epoch after a mid-epoch resume (it
    sets ``skip`` around its ``iter(dataloader)``, which with workers calls
    ``iter()`` here twice).

    Args:
        sampler (Sampler): The index sampler (``DefaultSampler``); exposed
            as ``.sampler`` so ``DistSamplerSeedHook`` can call its
            ``set_epoch``.
        batch_size (int): Samples per batch.
        batch_sampler (dict | Sampler, optional): The batch sampler to wrap,
            as a config (built with ``sampler`` and ``batch_size``) or an
            object. Defaults to None: batches of ``batch_size`` in sampler
            order.
        drop_last (bool): Drop a last, smaller batch; only used when
            ``batch_sampler`` is None. Defaults to False.
    """

    def __init__(self, sampler: Sampler, batch_size: int,
                 batch_sampler: Optional[Union[dict, Sampler]] = None,
                 drop_last: bool = False) -> None:
        if batch_sampler is None:
            batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        elif isinstance(batch_sampler, dict):
            batch_sampler = DATA_SAMPLERS.build(
                batch_sampler,
                default_args=dict(sampler=sampler, batch_size=batch_size))
        self.batch_sampler = batch_sampler
        self.sampler = sampler
        self.batch_size = batch_size
        self.skip = 0

    def __iter__(self) -> Iterator[Sequence[int]]:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # a full pass


@LOOPS.register_module()
class ResumableEpochBasedTrainLoop(EpochBasedTrainLoop):
    """MMEngine's epoch-based training loop, resumable inside an epoch and
    with every iteration's randomness fixed by ``(seed, iteration)``.

    MMEngine's ``EpochBasedTrainLoop`` restores epoch and iteration on
    resume but starts the epoch's data from its first batch again, so after
    a kill mid-epoch some samples are trained twice and the random streams
    differ. This loop:

    * wraps the train dataloader's batch sampler in
      ``ResumableBatchSampler``, and its dataset in ``SkipBadSamples`` (an
      unreadable image is replaced by another sample; see
      :class:`~mila_det.datasets.SkipBadSamples`) unless
      ``skip_bad_samples`` is False;
    * at the start of each epoch computes ``done = iter - epoch *
      len(dataloader)``, the batches of this epoch the checkpoint already
      trained (0 except in the first epoch after resuming from an
      ``IterCheckpointHook`` checkpoint), draws the epoch's batch order as
      an uninterrupted run does (``DistSamplerSeedHook`` has set the
      sampler's epoch) and skips those ``done`` batches without loading
      them; ``batch_idx`` passed to hooks and the logs counts from
      ``done``;
    * reseeds Python, NumPy and torch from :func:`iteration_seed` ``(seed,
      iter)`` right before fetching each batch, so data augmentation done
      in the main process (``num_workers=0``) and the training step
      (drop-path, RoI sampling) draw the same numbers as in an
      uninterrupted run.

    With ``randomness=dict(seed=..., deterministic=True)`` on CPU and
    ``num_workers=0`` (the demo configs) a run resumed from any checkpoint
    ends bit-identical to an uninterrupted one. With dataloader workers
    (the COCO configs), each sample is still trained exactly once per
    epoch, in the same order, with the same model-side randomness; the
    workers' augmentation streams are seeded by MMEngine per worker and
    restart with them, so augmentations after a resume differ from the
    uninterrupted run's (as do GPU kernels run to run).

    Args:
        runner (Runner): The runner.
        dataloader (DataLoader | dict): The train dataloader or its config.
            A config gets its batch sampler wrapped; a built ``DataLoader``
            must already use ``ResumableBatchSampler`` to resume mid-epoch.
        max_epochs (int): Epochs to train.
        skip_bad_samples (bool | dict): Wrap the train dataset (from a
            config) in ``SkipBadSamples``; a dict gives its arguments
            (``max_retries``, ``check_size``). Defaults to True.
        **kwargs: ``val_begin``, ``val_interval``, ``dynamic_intervals`` as
            for ``EpochBasedTrainLoop``.
    """

    def __init__(self, runner, dataloader: Union[DataLoader, dict],
                 max_epochs: int, skip_bad_samples: Union[bool, dict] = True,
                 **kwargs) -> None:
        if isinstance(dataloader, dict):
            dataloader = self._resumable_loader_cfg(dataloader,
                                                    skip_bad_samples)
        super().__init__(runner, dataloader, max_epochs, **kwargs)

    @staticmethod
    def _resumable_loader_cfg(cfg: dict,
                              skip_bad_samples: Union[bool, dict] = False
                              ) -> dict:
        """``cfg`` with its batch sampler wrapped in ResumableBatchSampler
        (a ``drop_last`` without a batch sampler moves into the wrapper)
        and, if ``skip_bad_samples``, its dataset in SkipBadSamples."""
        cfg = dict(cfg)
        dataset = cfg.get('dataset')
        if skip_bad_samples and isinstance(dataset, dict) and \
                dataset.get('type') not in ('SkipBadSamples', SkipBadSamples):
            options = skip_bad_samples if isinstance(skip_bad_samples,
                                                     dict) else {}
            cfg['dataset'] = dict(type=SkipBadSamples, dataset=dataset,
                                  **options)
        inner = cfg.pop('batch_sampler', None)
        if isinstance(inner, ResumableBatchSampler) or (
                isinstance(inner, dict) and inner.get('type') in (
                    'ResumableBatchSampler', ResumableBatchSampler)):
            cfg['batch_sampler'] = inner
            return cfg
        wrapper = dict(type=ResumableBatchSampler, batch_sampler=inner)
        if inner is None and 'drop_last' in cfg:
            wrapper['drop_last'] = cfg.pop('drop_last')
        cfg['batch_sampler'] = wrapper
        return cfg

    def _batches_done_in_epoch(self) -> int:
        """Batches of the current epoch already trained (by a checkpoint)."""
        per_epoch = len(self.dataloader)
        done = self._iter - self._epoch * per_epoch
        if not 0 <= done <= per_epoch:
            raise RuntimeError(
                f'cannot resume epoch {self._epoch + 1} at iteration '
                f'{self._iter}: an epoch has {per_epoch} batches here, so '
                f'it spans iterations {self._epoch * per_epoch}-'
                f'{(self._epoch + 1) * per_epoch}. Resume with the batch '
                'size and number of processes the checkpoint was trained '
                'with.')
        return done

    def _epoch_batches(self, skip: int) -> Iterator:
        """An iterator over this epoch's batches after the first ``skip``
        (drawn as indices only, never loaded)."""
        if not skip:
            return iter(self.dataloader)
        batch_sampler = self.dataloader.batch_sampler
        if not isinstance(batch_sampler, ResumableBatchSampler):
            raise TypeError(
                'resuming inside an epoch needs the train dataloader built '
                'from a config (or with a ResumableBatchSampler); it has a '
                f'{type(batch_sampler).__name__}')
        self.runner.logger.info(
            f'Resuming epoch {self._epoch + 1} after its first {skip} of '
            f'{len(self.dataloader)} batches (skipped without being read)')
        batch_sampler.skip = skip
        try:
            return iter(self.dataloader)
        finally:
            batch_sampler.skip = 0

    def _seeded_batches(self, batches: Iterator) -> Iterator:
        """Yield from ``batches``, reseeding from ``(seed, iter)`` before
        each fetch."""
        while True:
            seed_everything(iteration_seed(self.runner.seed, self._iter))
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch

    def run_epoch(self) -> None:
        """Train the rest of the current epoch: all of it, or what follows
        the batches a mid-epoch checkpoint had already trained."""
        self.runner.call_hook('before_train_epoch')
        self.runner.model.train()
        done = self._batches_done_in_epoch()
        if done < len(self.dataloader):
            batches = self._seeded_batches(self._epoch_batches(skip=done))
            for idx, data_batch in enumerate(batches, start=done):
                self.run_iter(idx, data_batch)
        self.runner.call_hook('after_train_epoch')
        self._epoch += 1
