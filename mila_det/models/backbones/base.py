"""What MILA and VMamba share as MMDetection backbones: stage indices,
freezing, and initialisation from an official checkpoint."""
import re
from typing import Dict, List, Sequence, Tuple, Union

import torch.nn as nn
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm
from mmengine.model.weight_init import trunc_normal_

from mila_det.utils.checkpoint import load_pretrained


def init_linear_and_norms(module: nn.Module) -> None:
    """The authors' init (MILA and VMamba alike): trunc-normal(0.02) weights
    and zero bias for every Linear (Linear2d included), weight 1 and bias 0
    for every LayerNorm; convolutions keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class StageBackbone(BaseModule):
    """Base of four-stage backbones with a stem ``patch_embed``, stages
    ``layers[i]`` (each holding its own downsample) and output norms named
    ``{norm_prefix}{i}``.

    Subclasses set ``arch_zoo`` (named settings) and ``arch_keys`` (what a
    custom arch dict must hold), ``ignored_keys`` (checkpoint keys unused by
    design) and ``norm_prefix``, and implement ``_reset_parameters``.
    """
    arch_zoo: Dict[str, dict] = {}
    arch_keys: Tuple[str, ...] = ()
    ignored_keys: Tuple[str, ...] = ()
    norm_prefix = 'norm'

    @classmethod
    def _parse_arch(cls, arch: Union[str, dict]) -> dict:
        name = cls.__name__
        if isinstance(arch, str):
            if arch.lower() not in cls.arch_zoo:
                raise KeyError(f'{name}: unknown arch {arch!r}; choose from '
                               f'{sorted(cls.arch_zoo)} or pass a dict')
            return dict(cls.arch_zoo[arch.lower()])
        if not isinstance(arch, dict) or not set(cls.arch_keys) <= set(arch):
            raise ValueError(f'{name}: a custom arch must be a dict with keys '
                             f'{sorted(cls.arch_keys)}, got {arch!r}')
        return dict(arch)

    @staticmethod
    def _check_stages(name: str, num_stages: int, out_indices: Sequence[int],
                      frozen_stages: int) -> Tuple[int, ...]:
        indices = [i + num_stages if i < 0 else i for i in out_indices]
        if not indices or any(not 0 <= i < num_stages for i in indices):
            raise ValueError(f'{name}: out_indices {tuple(out_indices)} must '
                             f'name stages in 0..{num_stages - 1}')
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f'{name}: frozen_stages={frozen_stages} must be '
                             f'in -1..{num_stages}')
        return tuple(indices)

    def _reset_parameters(self) -> None:
        raise NotImplementedError

    @property
    def optional_keys(self) -> Tuple[str, ...]:
        """Checkpoint keys that may be absent (ImageNet files have no output
        norms; they keep their init) or extra (norms of stages not in
        ``out_indices``; dropped)."""
        return (rf'{re.escape(self.norm_prefix)}\d+\.(weight|bias)', )

    def init_weights(self) -> None:
        """Random init, or the checkpoint named by a ``Pretrained`` init_cfg.

        ``init_cfg=dict(type='Pretrained', checkpoint=...)`` takes, besides
        ``checkpoint`` (a path or an ``https://``, ``open-mmlab://``...
        address):

        - ``prefix``: key prefix of the backbone inside a detector
          checkpoint. Defaults to ``'backbone.'``.
        - ``strict``: False loads only the tensors that fit and logs the
          rest at WARNING. Defaults to True: any missing or unexpected key
          is an error naming the arch the file fits.
        - ``safe_globals``: dotted names of classes a trusted file may
          unpickle besides tensors. Defaults to none.
        - ``map_location``: accepted as MMEngine's ``Pretrained`` takes it;
          the file is read onto the CPU either way.

        See :func:`mila_det.utils.checkpoint.load_pretrained`.
        """
        cfg = self.init_cfg
        if isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            known = {'type', 'checkpoint', 'prefix', 'strict',
                     'safe_globals', 'map_location'}
            if set(cfg) - known:
                raise ValueError(
                    f'{type(self).__name__}: unknown Pretrained init_cfg '
                    f'keys {sorted(set(cfg) - known)}; known: '
                    f'{sorted(known)}')
            load_pretrained(self, cfg.get('checkpoint'),
                            ignore=self.ignored_keys,
                            prefix=cfg.get('prefix', 'backbone.'),
                            optional=self.optional_keys,
                            strict=cfg.get('strict', True),
                            safe_globals=cfg.get('safe_globals', ()))
            self._is_init = True
        elif cfg is None:
            self._reset_parameters()
            self._is_init = True
        else:
            super().init_weights()

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        mods: List[nn.Module] = [self.patch_embed]
        for i in range(self.frozen_stages):
            mods.append(self.layers[i])
            if i in self.out_indices:
                mods.append(getattr(self, f'{self.norm_prefix}{i}'))
        return mods

    def _freeze_stages(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def _check_input(self, x) -> None:
        """Images must be ``[B, in_channels, H, W]``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f'{type(self).__name__} expects images [B, '
                f'{self.in_channels}, H, W] (in_channels={self.in_channels}),'
                f' got shape {tuple(x.shape)}')

    def train(self, mode: bool = True) -> 'StageBackbone':
        """Training mode, keeping frozen stages (and, with ``norm_eval``,
        every BatchNorm) in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and getattr(self, 'norm_eval', False):
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self
