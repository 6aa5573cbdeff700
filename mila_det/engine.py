"""Training-loop pieces MMEngine lacks: bf16 autocast on CPU, and
reproducible random streams across kill-and-resume."""
import random
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from mmdet.registry import HOOKS, OPTIM_WRAPPERS
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper


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


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Reseed Python, NumPy and torch at the start of every training epoch
    from ``(seed, epoch)``.

    MMEngine's checkpoints do not hold random-number states, so a run
    resumed after a kill would draw different augmentations and drop-path
    masks than the run it continues. With this hook each epoch's random
    stream depends only on the seed and the epoch, so an interrupted and
    resumed run ends exactly where an uninterrupted one does (on CPU, with
    ``randomness=dict(seed=..., deterministic=True)``).

    Args:
        seed (int, optional): Base seed. Defaults to the runner's seed.
    """
    priority = 'VERY_HIGH'

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = seed

    def before_train_epoch(self, runner) -> None:
        base = self.seed if self.seed is not None else runner.seed
        seed = (int(base) * 1_000_003 + runner.epoch) % (2**31)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
