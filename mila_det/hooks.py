"""Hooks that keep a long training run's work safe from what it meets:
divergence, half-written checkpoints, full disks and unreadable images.

* :class:`DivergenceGuardHook`: a step whose loss or gradient norm is not
  finite is skipped; after ``max_consecutive`` such steps in a row the run
  stops with a message naming the iteration, the loss terms that went
  non-finite and the newest good checkpoint. A checkpoint is never written
  from non-finite weights.
* :class:`SafeCheckpointHook`: MMEngine's ``CheckpointHook`` with atomic
  writes (:func:`save_checkpoint_atomically`), an atomic
  ``last_checkpoint``, and old checkpoints removed only once the new one is
  complete (MMEngine deletes the oldest first, so a failed save used to
  leave one checkpoint fewer).
* :class:`SkippedSamplesHook`: reports the training samples
  :class:`~mila_det.datasets.SkipBadSamples` replaced (one warning per
  file, a list at the end of each epoch) and stops the run past a limit.

The errors these raise (:class:`TrainingStopped` and its subclasses) carry
a complete message for the user; ``tools/train.py`` prints it without a
traceback. Under distributed training every rank stops together: the
divergence guard and the sample count agree across ranks each iteration,
and an error while rank 0 writes a checkpoint is raised on every rank
(:func:`stopping_together`), so no rank hangs in a collective.
"""
import contextlib
import functools
import math
import os.path as osp
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from mmdet.registry import HOOKS
from mmengine.dist import (all_gather_object, all_reduce, get_world_size,
                           is_main_process)
from mmengine.fileio import get_file_backend
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper

from .utils.atomic_io import (AtomicWriteError, atomic_write, commit,
                              remove_quietly, temporary_name, write_failure)
from .utils.resume import newest_checkpoint


class TrainingStopped(RuntimeError):
    """The run was stopped on purpose; the message says why and what to
    do."""


class DivergenceError(TrainingStopped):
    """The loss or the weights stopped being finite."""


class CheckpointWriteError(TrainingStopped):
    """A checkpoint could not be written (full disk, I/O error)."""


class BadSampleLimitError(TrainingStopped):
    """More training images were unreadable than the run allows."""


@contextlib.contextmanager
def stopping_together() -> Iterator[None]:
    """Run the block on every rank; if it raises on some ranks, every rank
    raises, so that none is left waiting for the others in its next
    collective (rank 0 alone writes checkpoints, so a full disk or a
    refused checkpoint is seen there only). The rank that failed raises
    its own error; the others raise the same :class:`TrainingStopped`
    class (the base class for an error of another kind) with that rank's
    message. Without distributed training it is a plain block. Every rank
    must enter it."""
    error: Optional[Exception] = None
    try:
        yield
    except Exception as err:  # raised again below, on every rank
        error = err
    if get_world_size() > 1:
        summary = None
        if isinstance(error, TrainingStopped):
            summary = (type(error), str(error))
        elif error is not None:
            summary = (TrainingStopped, f'{type(error).__name__}: {error}')
        failures = [(rank, s) for rank, s in enumerate(
            all_gather_object(summary)) if s is not None]
        if error is None and failures:
            rank, (cls, text) = failures[0]
            raise cls(f'stopped on every rank, as rank {rank} failed: '
                      f'{text}')
    if error is not None:
        raise error


def _restart_hint(work_dir: str, example: bool = False) -> str:
    """Where a diverged run can go on from, and how."""
    newest = newest_checkpoint(work_dir)
    change = ('a lower learning rate (optim_wrapper.optimizer.lr) or '
              'gradient clipping (optim_wrapper.clip_grad)')
    if newest is None:
        return (f'There is no checkpoint in {work_dir} yet: start again '
                f'with {change}.')
    hint = f'newest good checkpoint: {newest}. Continue from it with {change}'
    if example:
        hint += (', e.g. --cfg-options load_from=<checkpoint> '
                 'optim_wrapper.optimizer.lr=<lower>; --resume restores the '
                 "checkpoint's own lr and schedule")
    return hint + '.'


def _resume_hint(work_dir: str) -> str:
    newest = newest_checkpoint(work_dir)
    if newest is None:
        return f'there is no checkpoint in {work_dir} yet'
    return f'newest good checkpoint: {newest}'


# --------------------------------------------------------------------------
# atomic checkpoints


def _state_bytes(runner) -> int:
    """Bytes of the tensors a full checkpoint holds (weights, optimizer
    state): the size a checkpoint write needs, within its small pickle
    overhead."""
    model = runner.model.module if is_model_wrapper(runner.model) \
        else runner.model
    total = sum(t.numel() * t.element_size()
                for t in model.state_dict().values()
                if isinstance(t, torch.Tensor))
    stack = [runner.optim_wrapper.state_dict()]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def save_checkpoint_atomically(runner, out_dir: str, filename: str,
                               **kwargs) -> None:
    """``runner.save_checkpoint(out_dir, filename, **kwargs)``, written to a
    temporary name in ``out_dir``, flushed and renamed into place.

    Remote ``out_dir`` (``s3://`` ...) are written as MMEngine writes them.

    Raises:
        CheckpointWriteError: The write failed (full disk, I/O error); the
            temporary file is removed and ``<out_dir>/<filename>`` is
            untouched. The message names the folder, its free space, the
            size needed and the newest good checkpoint.
    """
    backend_args = kwargs.get('backend_args')
    if not isinstance(get_file_backend(out_dir, backend_args=backend_args),
                      LocalBackend):
        runner.save_checkpoint(out_dir, filename, **kwargs)
        return
    path = osp.join(out_dir, filename)
    tmp_path = temporary_name(path)
    try:
        runner.save_checkpoint(out_dir, osp.basename(tmp_path), **kwargs)
        if is_main_process():  # save_checkpoint writes on rank 0 only
            commit(tmp_path, path)
    except OSError as err:
        remove_quietly(tmp_path)
        failure = err if isinstance(err, AtomicWriteError) else \
            write_failure(path, err, _state_bytes(runner), 'checkpoint')
        message = (f'{failure.message} {_resume_hint(runner.work_dir)}. '
                   'Free some space (or pick another --work-dir) and '
                   'continue with tools/train.py CONFIG --resume.')
        runner.logger.error(message)
        raise CheckpointWriteError(message) from err


def write_last_checkpoint(work_dir: str, checkpoint: str) -> None:
    """Point ``<work_dir>/last_checkpoint`` at ``checkpoint``, atomically."""
    try:
        atomic_write(osp.join(work_dir, 'last_checkpoint'), checkpoint,
                     what='the checkpoint pointer')
    except AtomicWriteError as err:
        raise CheckpointWriteError(
            f'{err} The checkpoint {checkpoint} itself is complete; '
            f'resume from it with tools/train.py CONFIG --resume '
            f'{checkpoint}.') from err


def save_checkpoint_then_prune(runner, out_dir: str, filename: str,
                               stale: Sequence[str], backend=None,
                               **kwargs) -> None:
    """Save ``filename`` in ``out_dir`` atomically
    (:func:`save_checkpoint_atomically`, ``kwargs`` passed on); only once it
    is complete, remove the ``stale`` checkpoints there (files, or
    DeepSpeed's folders) and point ``last_checkpoint`` at the new one, on
    rank 0. If any of it fails, every rank stops (:func:`stopping_together`).
    ``backend`` is ``out_dir``'s file backend (found from it when None)."""
    backend = backend or get_file_backend(out_dir)
    with stopping_together():
        save_checkpoint_atomically(runner, out_dir, filename, **kwargs)
        if not is_main_process():
            return
        for name in stale:
            path = backend.join_path(out_dir, name)
            if backend.isfile(path):
                backend.remove(path)
            elif backend.isdir(path):
                backend.rmtree(path)
        write_last_checkpoint(runner.work_dir,
                              backend.join_path(out_dir, filename))


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """MMEngine's ``CheckpointHook`` (same arguments) whose checkpoints and
    ``last_checkpoint`` are written atomically, and which removes a
    checkpoint beyond ``max_keep_ckpts`` only after the new one is
    complete.

    A failed write stops the run with :class:`CheckpointWriteError`; the
    previous checkpoints and ``last_checkpoint`` stay as they were.
    """

    def _save_checkpoint_with_step(self, runner, step: int,
                                   meta: dict) -> None:
        stale: List[int] = []
        if self.max_keep_ckpts > 0 and not (
                self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                stale.append(self.keep_ckpt_ids.popleft())
            self.keep_ckpt_ids.append(step)
            # recorded before saving, so the checkpoint lists itself
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir,
                                                     ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        save_checkpoint_then_prune(
            runner, self.out_dir, ckpt_filename,
            [self.filename_tmpl.format(old) for old in stale],
            self.file_backend,
            file_client_args=self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta, by_epoch=self.by_epoch,
            backend_args=self.backend_args, **self.args)


# --------------------------------------------------------------------------
# divergence


def _gradients(optim_wrapper: OptimWrapper) -> List[torch.Tensor]:
    return [p.grad for group in optim_wrapper.optimizer.param_groups
            for p in group['params'] if p.grad is not None]


class _StepGuard:
    """Wraps one optim wrapper's ``backward`` and ``step`` (on the instance,
    whatever its class: OptimWrapper, AmpOptimWrapper, our CPU autocast
    one) so a step with a non-finite loss or gradient norm is skipped.

    Under ``AmpOptimWrapper`` a non-finite gradient is the loss scaler's
    business (it skips that step and lowers the scale, as usual) and is not
    counted; a non-finite loss is.
    """

    def __init__(self, optim_wrapper: OptimWrapper) -> None:
        self.optim_wrapper = optim_wrapper
        self.amp = hasattr(optim_wrapper, 'loss_scaler')
        self.loss_finite: Optional[torch.Tensor] = None
        self.skipped: List[Dict[str, float]] = []  # this iteration's
        # whether step() was called this iteration (with gradient
        # accumulation, only every k-th iteration steps)
        self.stepped = False
        # what the instance held before (MMEngine's parameter schedulers
        # put a step counter there), to restore in restore()
        self.saved = {name: vars(optim_wrapper)[name]
                      for name in ('backward', 'step')
                      if name in vars(optim_wrapper)}
        self.inner_backward = optim_wrapper.backward
        self.inner_step = optim_wrapper.step

        def backward(loss: torch.Tensor, **kwargs) -> None:
            self.backward(loss, **kwargs)

        def step(**kwargs) -> None:
            self.step(**kwargs)

        # keeps the counter's marker (``_with_counter``) the schedulers check
        functools.update_wrapper(step, self.inner_step)
        optim_wrapper.backward = backward
        optim_wrapper.step = step

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self.loss_finite = finite if self.loss_finite is None else \
            self.loss_finite & finite
        self.inner_backward(loss, **kwargs)

    def step(self, **kwargs) -> None:
        self.stepped = True
        loss_ok = self.loss_finite if self.loss_finite is not None else \
            torch.tensor(True)
        self.loss_finite = None
        grad_norm = torch.tensor(0.0)
        if not self.amp:
            grads = _gradients(self.optim_wrapper)
            if grads:
                grad_norm = torch.nn.utils.get_total_norm(grads)
        bad = (~loss_ok.to(grad_norm.device)) | ~torch.isfinite(grad_norm)
        bad = bad.float().reshape(1)
        if get_world_size() > 1:  # every rank skips, or none
            all_reduce(bad, op='sum')
        if bool(bad.item()):
            self.skipped.append(dict(
                loss_finite=bool(loss_ok.item()),
                grad_norm=float(grad_norm.item())))
            return
        self.inner_step(**kwargs)

    def restore(self) -> None:
        for name in ('backward', 'step'):
            if name in self.saved:
                setattr(self.optim_wrapper, name, self.saved[name])
            else:  # back to the class's method
                delattr(self.optim_wrapper, name)


@HOOKS.register_module()
class DivergenceGuardHook(Hook):
    """Skip optimizer steps with a non-finite loss or gradient norm, stop a
    run that keeps producing them, and never save non-finite weights.

    * Every step whose summed loss or gradient norm (over all parameters,
      before clipping) is NaN or inf is skipped (the gradients are
      dropped); a warning names the iteration and the loss terms that were
      not finite. With fp16 ``AmpOptimWrapper`` the loss scaler keeps
      handling gradient overflow as before.
    * After ``max_consecutive`` skipped steps in a row the run stops with
      :class:`DivergenceError`: the message names the iteration, the loss
      terms and the newest good checkpoint to continue from.
    * Before any checkpoint is written, its weights are checked: a
      checkpoint with a NaN/inf weight is never written (the run stops
      instead), so the checkpoints on disk, and the newest of them, stay
      finite and ``max_keep_ckpts`` never rotates a good one out for a bad
      one.

    Args:
        max_consecutive (int): Non-finite steps in a row that stop the run.
            Defaults to 5.
    """
    priority = 'ABOVE_NORMAL'  # before the checkpoint hooks (VERY_LOW, LOW)

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError('max_consecutive must be at least 1, got '
                             f'{max_consecutive}')
        self.max_consecutive = max_consecutive
        self.guards: List[_StepGuard] = []
        self.streak = 0
        self.first_bad_iter: Optional[int] = None
        self.bad_terms: Dict[str, None] = {}  # ordered set

    def before_train(self, runner) -> None:
        wrappers = [runner.optim_wrapper]
        if not isinstance(runner.optim_wrapper, OptimWrapper):
            wrappers = list(runner.optim_wrapper.values())  # OptimWrapperDict
        self.guards = [_StepGuard(w) for w in wrappers]

    def after_train(self, runner) -> None:
        for guard in self.guards:
            guard.restore()
        self.guards = []

    @staticmethod
    def _non_finite_terms(outputs: Optional[dict]) -> List[str]:
        terms = []
        for name, value in (outputs or {}).items():
            value = torch.as_tensor(value).detach()
            if value.is_floating_point() and not bool(
                    torch.isfinite(value).all()):
                terms.append(f'{name}={float(value.float().mean()):g}')
        return terms

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Optional[Union[dict, tuple, list]] = None,
                         outputs: Optional[dict] = None) -> None:
        skipped = [s for g in self.guards for s in g.skipped]
        stepped = any(g.stepped for g in self.guards)
        for guard in self.guards:
            guard.skipped, guard.stepped = [], False
        if not skipped:
            if stepped:  # an iteration that only accumulated says nothing
                self.streak, self.first_bad_iter, self.bad_terms = 0, None, {}
            return
        iteration = runner.iter + 1
        self.streak += 1
        if self.first_bad_iter is None:
            self.first_bad_iter = iteration
        terms = self._non_finite_terms(outputs)
        if not all(s['loss_finite'] for s in skipped) and not terms:
            terms = ['loss (summed)']
        if any(not math.isfinite(s['grad_norm']) for s in skipped):
            terms.append('grad_norm=' + ','.join(
                f"{s['grad_norm']:g}" for s in skipped))
        for term in terms:
            self.bad_terms[term.split('=')[0]] = None
        runner.logger.warning(
            f'iteration {iteration}: non-finite {", ".join(terms)}; '
            f'optimizer step skipped ({self.streak} in a row, the run stops '
            f'at {self.max_consecutive})')
        if self.streak >= self.max_consecutive:
            message = (
                f'training diverged: {self.streak} optimizer steps in a row '
                f'had a non-finite loss or gradient norm, from iteration '
                f'{self.first_bad_iter} to {iteration} (non-finite: '
                f'{", ".join(self.bad_terms)}); the run is stopped and no '
                f'checkpoint was written from these weights. '
                f'{_restart_hint(runner.work_dir, example=True)}')
            runner.logger.error(message)
            raise DivergenceError(message)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        bad = [name for name, value in checkpoint['state_dict'].items()
               if isinstance(value, torch.Tensor)
               and value.is_floating_point()
               and not bool(torch.isfinite(value).all())]
        if not bad:
            return
        meta = checkpoint.get('meta', {})
        message = (
            f'training diverged: at iteration {meta.get("iter", runner.iter)}'
            f' {len(bad)} weight tensors hold NaN/inf (e.g. {bad[0]}); the '
            'checkpoint due now was not written and the older ones were '
            f'kept. {_restart_hint(runner.work_dir)}')
        runner.logger.error(message)
        raise DivergenceError(message)


# --------------------------------------------------------------------------
# bad samples


@HOOKS.register_module()
class SkippedSamplesHook(Hook):
    """Report the training images ``SkipBadSamples`` replaced, and stop the
    run when there are too many.

    ``SkipBadSamples`` (every config's train dataset, put in place by
    ``ResumableEpochBasedTrainLoop``) notes each image it could not use in
    the replacement sample's metainfo (``skipped_samples``), so the note
    reaches this hook in the main process also from dataloader workers.
    Each file is warned about once, with the reason; at the end of each
    epoch the files skipped in it are counted and listed. Once more
    distinct files than the limit were skipped in the run (the count
    survives resuming), the run stops with :class:`BadSampleLimitError`
    listing them. Under distributed training the files are counted over
    every rank's batches, and every rank stops at the same iteration.

    Args:
        max_fraction (float): The limit as a fraction of the train dataset.
            Defaults to 0.001 (0.1%).
        max_files (int, optional): The limit as a number of files; overrides
            ``max_fraction``. Defaults to None.

    The limit is at least one file.
    """
    priority = 'NORMAL'
    info_key = 'skipped_samples'

    def __init__(self, max_fraction: float = 0.001,
                 max_files: Optional[int] = None) -> None:
        if not 0 <= max_fraction <= 1:
            raise ValueError(
                f'max_fraction must be in [0, 1], got {max_fraction}')
        if max_files is not None and max_files < 0:
            raise ValueError(f'max_files must be >= 0, got {max_files}')
        self.max_fraction = max_fraction
        self.max_files = max_files
        self.epoch_skips: Dict[str, str] = {}

    def limit(self, dataset_size: int) -> int:
        """Distinct unreadable files the run tolerates."""
        if self.max_files is not None:
            return max(1, self.max_files)
        return max(1, int(self.max_fraction * dataset_size))

    def before_train_epoch(self, runner) -> None:
        self.epoch_skips = {}

    @staticmethod
    def _notes(data_batch) -> List[Sequence[str]]:
        samples = data_batch.get('data_samples', []) if isinstance(
            data_batch, dict) else []
        notes = []
        for sample in samples or []:
            meta = getattr(sample, 'metainfo', {})
            notes.extend(meta.get('skipped_samples', []))
        return notes

    @staticmethod
    def _from_every_rank(notes: List[Sequence[str]]) -> List[Sequence[str]]:
        """Every rank's notes of this iteration, on every rank, so that all
        ranks count the same files, stop together and checkpoint the whole
        list. One small all-reduce per iteration; the notes themselves are
        gathered only when some rank has any."""
        count = torch.tensor([float(len(notes))])
        all_reduce(count)  # MMEngine moves it to the backend's device
        if not count.item():
            return []
        return [note for part in all_gather_object(notes) for note in part]

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Optional[Union[dict, tuple, list]] = None,
                         outputs: Optional[dict] = None) -> None:
        notes = self._notes(data_batch)
        if get_world_size() > 1:
            notes = self._from_every_rank(notes)
        if not notes:
            return
        seen: Dict[str, str] = dict(
            runner.message_hub.get_info(self.info_key, {}))
        for path, reason in notes:
            self.epoch_skips[path] = reason
            if path not in seen:
                seen[path] = reason
                runner.logger.warning(
                    f'skipped training image {path}: {reason}; another '
                    'sample was drawn in its place')
        runner.message_hub.update_info(self.info_key, seen)
        limit = self.limit(len(runner.train_dataloader.dataset))
        if len(seen) > limit:
            listing = '\n'.join(f'  {p}: {r}' for p, r in seen.items())
            message = (
                f'{len(seen)} training images could not be used, more than '
                f'the limit of {limit} (default_hooks.skipped_samples: '
                f'max_fraction={self.max_fraction}, '
                f'max_files={self.max_files}); the run is stopped. Fix or '
                'remove them (tools/check_dataset.py CONFIG lists every '
                f'bad file) and resume with --resume:\n{listing}')
            runner.logger.error(message)
            raise BadSampleLimitError(message)

    def after_train_epoch(self, runner) -> None:
        if not self.epoch_skips:
            return
        listing = '\n'.join(f'  {p}: {r}'
                            for p, r in self.epoch_skips.items())
        runner.logger.warning(
            f'epoch {runner.epoch + 1}: {len(self.epoch_skips)} training '
            f'image(s) skipped (replaced by other samples):\n{listing}')


__all__ = [
    'BadSampleLimitError', 'CheckpointWriteError', 'DivergenceError',
    'DivergenceGuardHook', 'SafeCheckpointHook', 'SkippedSamplesHook',
    'TrainingStopped', 'save_checkpoint_atomically', 'write_last_checkpoint'
]
