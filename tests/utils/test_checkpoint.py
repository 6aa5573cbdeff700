"""Pretrained checkpoints: the official layouts load, files that do not fit
or are not plain tensors are refused with messages that say why and what to
do, every address scheme goes through MMEngine's CheckpointLoader with
weights-only unpickling and no process-wide change (no environment variable,
nothing left in torch's allow-list), and the authors' MM_VSSM config
initialises as their code does. Addresses served over HTTP are tested in
test_weights_by_address.py.

The fake checkpoints carry exactly the keys and shapes of the official
listings in ``tests/data/reference/*_official_keys.txt``; tensor ``i`` of a
file holds the value ``i`` (a one-element tensor expanded to its shape, so
even a MILA-B file takes a few kilobytes), which shows that every tensor
lands under its own name.
"""
import ast
import logging
import os
import pickle
import re
from typing import Dict, List, Optional

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.runner import CheckpointLoader
from torch import Tensor

from mila_det.models.backbones import MILA, MM_VSSM, VMamba
from mila_det.utils.checkpoint import (CheckpointError, load_pretrained,
                                       mmengine_safe_globals)
from tests.conftest import official_key_listing

MILA_KEYS = 'mila_official_keys.txt'
VMAMBA_KEYS = 'vmamba_official_keys.txt'
SWIN_URL_PREFIX = 'https://github.com/SwinTransformer/'
# torch's switch for unsafe loading by default (a user's choice we override)
FORCE_NO_WEIGHTS_ONLY = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'


# ---------------------------------------------------------------- helpers
def listing(file: str, title_start: str) -> Dict[str, str]:
    """Key -> shape string of the one section whose title starts so."""
    sections = official_key_listing(file)
    titles = [t for t in sections if t.startswith(title_start)]
    assert len(titles) == 1, (title_start, list(sections))
    return sections[titles[0]]


def official_tensors(keys: Dict[str, str]) -> Dict[str, Tensor]:
    """One tensor per listed key, of the listed shape, holding its index."""
    tensors = {}
    for i, (key, shape) in enumerate(keys.items()):
        dtype = (torch.long if key.endswith('num_batches_tracked') else
                 torch.float32)
        tensors[key] = torch.full((), i, dtype=dtype).expand(
            ast.literal_eval(shape))
    return tensors


def mila_imagenet(arch: str) -> Dict[str, Tensor]:
    """An official MILA ImageNet release (MLLA_T.pth etc.): classifier,
    final norm and RoPE tables, no output norms."""
    return official_tensors(
        listing(MILA_KEYS, f'MILA-{arch} official imagenet state dict'))


def mila_coco(arch: str) -> Dict[str, Tensor]:
    """The backbone of an official MILA Mask R-CNN (with RoPE tables)."""
    return official_tensors(
        listing(MILA_KEYS, f'MILA-{arch} official detection state dict'))


def vmamba_coco(arch: str) -> Dict[str, Tensor]:
    """The official VMamba detection backbone state dict."""
    return official_tensors(listing(
        VMAMBA_KEYS, f'VMamba-{arch} official detection backbone state dict'))


def vmamba_imagenet(arch: str) -> Dict[str, Tensor]:
    """An official VMamba ImageNet release, derived from the detection
    listing as the spec states it: no ``outnorm*``, plus the classifier's
    norm and 1000-way head (the parameter count checks the result)."""
    keys = {k: v for k, v in listing(
        VMAMBA_KEYS, f'VMamba-{arch} official detection backbone '
        'state dict').items() if not k.startswith('outnorm')}
    width = ast.literal_eval(keys['layers.3.blocks.0.norm.weight'])[0]
    keys.update({'classifier.norm.weight': f'({width},)',
                 'classifier.norm.bias': f'({width},)',
                 'classifier.head.weight': f'(1000,{width})',
                 'classifier.head.bias': '(1000,)'})
    return official_tensors(keys)


def save(path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def pretrained(path: str, **kwargs) -> dict:
    return dict(type='Pretrained', checkpoint=path, **kwargs)


def assert_loaded(model: torch.nn.Module, tensors: Dict[str, Tensor],
                  skip: str = r'$^') -> List[str]:
    """Every model tensor named in ``tensors`` holds the file's value."""
    own = model.state_dict()
    checked = [k for k in tensors if k in own and not re.match(skip, k)]
    for key in checked:
        assert torch.equal(own[key], tensors[key].to(own[key].dtype)), key
    return checked


class LogRecords:
    """The records MMEngine's current logger emits while installed."""

    def __init__(self) -> None:
        self.records: List[logging.LogRecord] = []
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = self.records.append

    def at(self, level: int) -> List[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]


@pytest.fixture
def log_records():
    logger = MMLogger.get_current_instance()
    records = LogRecords()
    logger.addHandler(records.handler)
    yield records
    logger.removeHandler(records.handler)


class LoadSpy:
    """Records the ``weights_only`` argument of every ``torch.load`` call
    and the environment at that moment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: List[tuple] = []
        real = torch.load

        def spy(*args, **kwargs):
            self.calls.append((kwargs.get('weights_only'), dict(os.environ)))
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, 'load', spy)

    def assert_all_weights_only(self) -> None:
        """Every call asked for weights-only unpickling explicitly (which
        wins over TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) and ran in the
        environment the test set (no variable added)."""
        assert self.calls
        assert all(w is True for w, _ in self.calls), self.calls
        assert all(env == dict(os.environ) for _, env in self.calls)


class Opaque:
    """A pickled object that weights-only unpickling refuses."""


OPAQUE = f'{__name__}.Opaque'


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize('arch', ['T', 'S'])
def test_official_mila_imagenet_checkpoint_loads(arch, tmp_path):
    """MLLA_{T,S}.pth as released: every backbone tensor loads; the
    classifier, final norm and RoPE tables are dropped; only the output
    norms (absent from ImageNet files) keep their init."""
    tensors = mila_imagenet(arch)
    path = save(tmp_path / f'MLLA_{arch}.pth', {'model': tensors,
                                                'epoch': 300})
    model = MILA(arch.lower())
    report = load_pretrained(model, path, ignore=model.ignored_keys,
                             optional=model.optional_keys)
    assert report.missing == report.unexpected == report.mismatched == []
    assert report.fresh == [f'norm{i}.{p}' for i in range(4)
                            for p in ('weight', 'bias')]
    depth = sum(model.arch_settings['depths'])
    assert len(report.ignored) == 2 + 2 + depth  # head, norm, rope tables
    assert len(report.loaded) + len(report.fresh) == len(model.state_dict())
    assert len(assert_loaded(model, tensors)) == len(report.loaded)


def test_official_vmamba_imagenet_checkpoint_loads(tmp_path):
    tensors = vmamba_imagenet('T')
    assert sum(t.numel() for t in tensors.values()) == 30_249_064  # spec
    path = save(tmp_path / 'vssm1_tiny_0230s_ckpt_epoch_264.pth',
                {'model': tensors})
    model = VMamba('tiny')
    report = load_pretrained(model, path, ignore=model.ignored_keys,
                             optional=model.optional_keys)
    assert report.missing == report.unexpected == report.mismatched == []
    assert report.fresh == [f'outnorm{i}.{p}' for i in range(4)
                            for p in ('weight', 'bias')]
    assert sorted(report.ignored) == sorted(
        k for k in tensors if k.startswith('classifier.'))
    assert len(assert_loaded(model, tensors)) == len(report.loaded) == 272


@pytest.mark.parametrize('name, out_indices', [
    ('MILA', (0, 1, 2, 3)), ('MILA', (1, 2, 3)), ('VMamba', (0, 1, 2, 3))])
def test_official_coco_checkpoint_loads(name, out_indices, tmp_path,
                                        log_records):
    """An MMDetection Mask R-CNN file (``state_dict``, ``backbone.``
    prefix, neck and heads beside it) fills every backbone tensor through
    init_weights; output norms of stages not returned are dropped."""
    if name == 'MILA':
        backbone, model = mila_coco('T'), MILA('tiny', out_indices=out_indices)
    else:
        backbone, model = vmamba_coco('T'), VMamba('tiny')
    state = {f'backbone.{k}': v for k, v in backbone.items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(256, 96, 1, 1)
    state['roi_head.bbox_head.fc_cls.bias'] = torch.zeros(81)
    path = save(tmp_path / 'mask_rcnn.pth',
                {'state_dict': state, 'meta': {'epoch': 36}})
    model.init_cfg = pretrained(path)
    model.init_weights()
    own = model.state_dict()
    assert sorted(assert_loaded(model, backbone)) == sorted(own)  # all
    info, = [m for m in log_records.at(logging.INFO) if 'loaded' in m]
    assert f'loaded {len(own)}/{len(own)} tensors from {path}' in info
    assert '0 left at their init' in info
    assert not log_records.at(logging.WARNING)


# ---------------------------------------------------------------- misfits
@pytest.mark.parametrize('name, file_arch, arch, fits', [
    ('MILA', 'S', 'tiny', 'small'),
    ('MILA', 'B', 'tiny', 'base'),
    ('VMamba', 'S', 'tiny', 'small')])
def test_checkpoint_of_another_arch_is_refused(name, file_arch, arch, fits,
                                               tmp_path):
    """A MILA-S file given to MILA-T used to 'load 503/503 tensors' and
    train on; now it is an error that counts the misfits, names the first
    ones and the arch the file does fit, and loads nothing."""
    if name == 'MILA':
        tensors, model = mila_imagenet(file_arch), MILA(arch)
    else:
        tensors, model = vmamba_coco(file_arch), VMamba(arch)
    path = save(tmp_path / 'other.pth', {'model': tensors})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_cfg = pretrained(path)
    with pytest.raises(CheckpointError) as info:
        model.init_weights()
    message = str(info.value)
    assert message.startswith(f'{path} does not fit this {name} '
                              f"(arch '{arch}')")
    own = model.state_dict()
    ignore = re.compile('|'.join(model.ignored_keys))
    extra = [k for k in tensors if k not in own and not ignore.fullmatch(k)]
    assert f'{len(extra)} unexpected keys ({extra[0]}, ' in message
    reshaped = [k for k in tensors if k in own and
                tensors[k].shape != own[k].shape]
    if reshaped:
        assert f"of another shape (first '{reshaped[0]}'" in message
    assert f"it is a checkpoint of {name} arch '{fits}'" in message
    assert 'strict=False' in message
    for key, value in before.items():
        assert torch.equal(own[key], value), key
    if (name, file_arch) == ('MILA', 'S'):
        assert len(extra) == 432  # the count of the original report


def test_strict_false_loads_what_fits_with_a_warning(tmp_path, log_records):
    tensors = mila_imagenet('S')
    path = save(tmp_path / 'MLLA_S.pth', {'model': tensors})
    model = MILA('tiny', init_cfg=pretrained(path, strict=False))
    model.init_weights()
    loaded = assert_loaded(model, tensors)
    assert len(loaded) == len(model.state_dict()) - 8  # all but the norms
    warning, = log_records.at(logging.WARNING)
    assert f'loaded {len(loaded)}/{len(model.state_dict())}' in warning
    assert 'strict=False: missing 0 (none), unexpected 432 (' in warning


def test_foreign_and_empty_checkpoints_are_refused(tmp_path):
    model = MILA('tiny')
    with pytest.raises(ValueError, match='path is empty'):
        load_pretrained(model, '')
    path = save(tmp_path / 'resnet.pth', {'state_dict': {
        'conv1.weight': torch.zeros(64, 3, 7, 7)}})
    with pytest.raises(CheckpointError, match=re.escape(path) +
                       r": none of its 1 tensors belongs to MILA \(first "
                       r"key 'conv1.weight'\)"):
        load_pretrained(model, path)
    path = save(tmp_path / 'config_only.pth', {'meta': {'epoch': 1}})
    with pytest.raises(ValueError, match='no tensors found'):
        load_pretrained(model, path)


# ------------------------------------------------------- unsafe contents
def _truncated(tmp_path) -> bytes:
    whole = save(tmp_path / 'whole.pth', {'model': mila_coco('T')})
    with open(whole, 'rb') as f:
        data = f.read()
    return data[:len(data) // 2]


@pytest.mark.parametrize('content', ['random', 'empty', 'truncated'])
def test_unreadable_file_refused_without_unsafe_retry(content, tmp_path,
                                                      monkeypatch):
    """Not a checkpoint: a clear error naming the file, one weights-only
    attempt, no retry with weights_only=False - even when the user's
    environment asks torch for unsafe loading by default."""
    data = {'random': lambda: torch.randint(0, 256, (4096, ),
                                            dtype=torch.uint8).numpy()
            .tobytes(),
            'empty': lambda: b'',
            'truncated': lambda: _truncated(tmp_path)}[content]()
    path = tmp_path / 'MLLA_T.pth'
    path.write_bytes(data)
    monkeypatch.setenv(FORCE_NO_WEIGHTS_ONLY, '1')
    spy = LoadSpy(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        MILA('tiny', init_cfg=pretrained(str(path))).init_weights()
    assert not isinstance(info.value, pickle.UnpicklingError)
    assert str(path) in str(info.value)
    assert 'weights_only=False' not in str(info.value)
    assert len(spy.calls) == 1
    spy.assert_all_weights_only()
    assert os.environ.get(FORCE_NO_WEIGHTS_ONLY) == '1'  # untouched


def test_pickled_class_refused_by_name_and_allowed_on_purpose(tmp_path,
                                                              monkeypatch):
    tensors = mila_imagenet('T')
    path = save(tmp_path / 'with_objects.pth',
                {'model': tensors, 'config': Opaque()})
    spy = LoadSpy(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        MILA('tiny', init_cfg=pretrained(path)).init_weights()
    assert info.value.blocked == [OPAQUE]
    message = str(info.value)
    assert message.startswith(path) and f'refused {OPAQUE}.' in message
    assert f"safe_globals=['{OPAQUE}']" in message
    assert f'torch.serialization.safe_globals([{OPAQUE}])' in message
    assert len(spy.calls) == 1
    spy.assert_all_weights_only()
    # allowed for this file only, by name, still weights-only
    allowed = set(torch.serialization.get_safe_globals())  # a set in torch
    model = MILA('tiny', init_cfg=pretrained(path, safe_globals=[OPAQUE]))
    model.init_weights()
    assert_loaded(model, tensors)
    assert set(torch.serialization.get_safe_globals()) == allowed
    spy.assert_all_weights_only()
    with pytest.raises(ValueError, match="cannot import 'no_such.Thing'"):
        MILA('tiny', init_cfg=pretrained(
            path, safe_globals=['no_such.Thing'])).init_weights()


def test_mmengine_checkpoint_classes_allowed_only_during_a_load(
        tmp_path, monkeypatch):
    """A checkpoint as MMEngine's runner writes it (the message hub's
    HistoryBuffer with numpy inside, a MultiStepLR's state, AdamW's state)
    loads through MMEngine's loader (as ``--resume`` and ``load_from`` do)
    weights-only; its classes are allowed during that load only: torch's
    list holds none of them before or after (torch adds classes of its
    own lazily), and a plain weights-only ``torch.load`` still refuses the
    file."""
    from mmengine.logging import HistoryBuffer, MessageHub
    from mmengine.optim import MultiStepLR
    ours = set(mmengine_safe_globals())
    assert HistoryBuffer in ours
    assert not ours & set(torch.serialization.get_safe_globals())
    hub = MessageHub.get_instance('checkpoint_classes')
    for loss in (0.5, 0.25):
        hub.update_scalar('train/loss', loss)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = MultiStepLR(optimizer, milestones=[8, 11], by_epoch=True)
    path = save(tmp_path / 'epoch_1.pth', {
        'meta': {'epoch': 1, 'iter': 4, 'dataset_meta': {'classes': ('a', )}},
        'state_dict': model.state_dict(), 'message_hub': hub.state_dict(),
        'optimizer': optimizer.state_dict(),
        'param_schedulers': [scheduler.state_dict()]})
    spy = LoadSpy(monkeypatch)
    loaded = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    spy.assert_all_weights_only()
    buffer = loaded['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() == 0.375
    assert loaded['param_schedulers'][0]['milestones'] == {8: 1, 11: 1}
    assert not ours & set(torch.serialization.get_safe_globals())
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_a_load_keeps_the_users_own_allow_list_entries(tmp_path):
    """Classes the user allowed process-wide before a load are still
    allowed after it, also those among MMEngine's that the load allows
    for itself."""
    from mmengine.logging import HistoryBuffer
    path = save(tmp_path / 'epoch_1.pth', {'state_dict': {'w': torch.ones(2)}})
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([HistoryBuffer])  # the user's
    try:
        CheckpointLoader.load_checkpoint(path, map_location='cpu')
        assert HistoryBuffer in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


# --------------------------------------------------------------- schemes
@pytest.mark.parametrize('address, scheme', [
    ('torchvision://resnet50', 'torchvision://'),
    ('s3://bucket/MLLA_T.pth', r'(\S+\:)?s3://'),
    ('https://example.com/MLLA_T.pth', 'https://')])
def test_addresses_reach_their_mmengine_loader(address, scheme, tmp_path,
                                               monkeypatch):
    """Each scheme reaches the loader registered with MMEngine for it,
    with map_location='cpu'."""
    tensors = mila_imagenet('T')
    local = save(tmp_path / 'served.pth', {'model': tensors})
    calls = []

    def loader(filename: str, map_location: Optional[str] = None):
        calls.append((filename, map_location))
        return torch.load(local)

    assert scheme in CheckpointLoader._schemes
    monkeypatch.setitem(CheckpointLoader._schemes, scheme, loader)
    model = MILA('tiny', init_cfg=pretrained(address))
    model.init_weights()
    assert calls == [(address, 'cpu')]
    assert_loaded(model, tensors)


def test_missing_local_file_named_before_any_loader(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(CheckpointLoader._schemes, '',
                        lambda *args: calls.append(args))
    missing = tmp_path / 'nowhere' / 'MLLA_T.pth'
    with pytest.raises(FileNotFoundError) as info:
        MILA('tiny', init_cfg=pretrained(str(missing))).init_weights()
    assert f'pretrained checkpoint not found: {missing}' in str(info.value)
    assert "config's `pretrained` variable" in str(info.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError,
                       match=re.escape(str(tmp_path / 'data/MLLA_T.pth'))):
        load_pretrained(MILA('tiny'), 'data/MLLA_T.pth')
    assert calls == []


# --------------------------------------------------------- the authors'
AUTHORS_TINY_BACKBONE = dict(
    type='MM_VSSM', out_indices=(0, 1, 2, 3), pretrained='', dims=96,
    depths=(2, 2, 8, 2), ssm_d_state=1, ssm_dt_rank='auto', ssm_ratio=1.0,
    ssm_conv=3, ssm_conv_bias=False, forward_type='v05_noz', mlp_ratio=4.0,
    downsample_version='v3', patchembed_version='v2', drop_path_rate=0.2,
    norm_layer='ln2d')


@pytest.fixture
def authors_config(tmp_path) -> Config:
    """The authors' detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py
    (MzeroMiko/VMamba): MMDetection's Swin-T Mask R-CNN with its backbone
    dict updated (not replaced) by the VMamba keys, so the backbone also
    receives Swin's keys and its init_cfg, a Swin checkpoint URL."""
    path = tmp_path / 'mask_rcnn_vssm_fpn_coco_tiny.py'
    path.write_text(
        "_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']\n"
        "custom_imports = dict(imports=['mila_det'], "
        'allow_failed_imports=False)\n'
        f'model = dict(backbone={AUTHORS_TINY_BACKBONE!r})\n')
    cfg = Config.fromfile(str(path))
    backbone = cfg.model.backbone
    assert backbone.init_cfg.checkpoint.startswith(SWIN_URL_PREFIX)
    assert backbone.embed_dims == 96 and backbone.with_cp is False
    return cfg


def test_mm_vssm_authors_config_builds_and_keeps_its_init(authors_config,
                                                          monkeypatch,
                                                          log_records):
    """What the authors' code does with this config: their ``MM_VSSM``
    calls ``BaseModule.__init__()`` without an init_cfg and hands every key
    to ``Backbone_VSSM``, whose ``**kwargs`` swallow the Swin keys and the
    Swin init_cfg. ``pretrained=''`` is tried with ``open('')``, which
    fails; the failure is printed and the random init stays. MMEngine's
    ``init_weights`` then finds no init_cfg and leaves the backbone alone.
    So: the Swin URL is never downloaded, nothing is loaded, and the
    weights after ``init_weights`` are those the constructor drew. We do
    the same, and say so in one warning (where the authors print their
    failed load)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()

    def no_download(*args, **kwargs):
        raise AssertionError(f'tried to load a checkpoint: {args}')

    monkeypatch.setattr(CheckpointLoader, 'load_checkpoint', no_download)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_download)
    detector = MODELS.build(authors_config.model)
    backbone = detector.backbone
    assert isinstance(backbone, MM_VSSM) and backbone.init_cfg is None
    assert sum(p.numel() for p in backbone.parameters()) == 29_481_408
    assert [len(layer.blocks) for layer in backbone.layers] == [2, 2, 8, 2]
    drawn = {k: v.clone() for k, v in backbone.state_dict().items()}
    detector.init_weights()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, drawn[key]), key
    warning, = log_records.at(logging.WARNING)
    assert "pretrained='' names no checkpoint" in warning
    assert SWIN_URL_PREFIX in warning and 'not used' in warning
    with torch.no_grad():
        outs = backbone.eval()(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (1, 96, 16, 24), (1, 192, 8, 12), (1, 384, 4, 6), (1, 768, 2, 3)]


def test_mm_vssm_pretrained_loads_the_imagenet_file(authors_config,
                                                    tmp_path):
    """The authors trained with ``--cfg-options
    model.backbone.pretrained=<ImageNet file>``: that file loads (strictly,
    through our loader), the Swin init_cfg still plays no part."""
    tensors = vmamba_imagenet('T')
    path = save(tmp_path / 'vssm1_tiny_0230s_ckpt_epoch_264.pth',
                {'model': tensors})
    cfg = dict(authors_config.model.backbone, pretrained=path)
    cfg.pop('type')
    model = MM_VSSM(**cfg)
    assert model.init_cfg == pretrained(path)
    model.init_weights()
    assert len(assert_loaded(model, tensors)) == 272


def test_mm_vssm_checks_the_implemented_options():
    with pytest.raises(ValueError, match="forward_type='v05_noz'"):
        MM_VSSM(dims=16, depths=(1, 1, 1, 1), forward_type='v2')
    model = MM_VSSM(dims=16, depths=(1, 1, 1, 1), use_checkpoint=True,
                    with_cp=False)  # the Swin base's with_cp=False
    assert model.layers[0].with_cp
