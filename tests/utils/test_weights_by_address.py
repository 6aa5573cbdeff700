"""Checkpoints by address, without the internet: a small HTTP server on
127.0.0.1 stands in for both hosts, serving files under paths shaped like a
Tsinghua Cloud link (``/f/<id>/?dl=1``, no file name) and a GitHub release
asset (``/releases/download/%23v2cls/<name>.pth``), and counting requests.

Checked: a backbone's training init through such an address, once (the
second run reads the cache); an interrupted, refused or non-checkpoint
download leaves nothing in the cache and says where to put a copy; a local
copy wins (no request); the pre-flight check; a detector checkpoint by
address through ``tools/test.py`` and MMDetection's ``DetInferencer``.
"""
import http.server
import io
import os
import os.path as osp
import subprocess
import sys
import threading
from typing import Any, Dict, List, Set

import pytest
import torch
from mmengine.config import Config

from mila_det.models.backbones import MILA
from mila_det.utils.checkpoint import CheckpointError
from mila_det.utils.preflight import check_inputs
from mila_det.utils.weights import OFFICIAL_FILES, DownloadError, file_name
from tests.conftest import REPO_ROOT
from tests.helpers import TINY_MILA, narrow_heads, tiny_detector_cfg

TSINGHUA_PATH = '/f/7a19712877cb4242889c/?dl=1'
GITHUB_PATH = '/releases/download/%23v2cls/vssm1_tiny_0230s_ckpt_epoch_264.pth'
DETECTOR_PATH = '/releases/download/%23v2det/mask_rcnn_tiny_epoch_1.pth'
OTHER_TINY = dict(embed_dims=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET only; the path (query included) picks the file."""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        host = self.server
        host.requests.append(self.path)
        body = host.files.get(self.path)
        if body is None:
            self.send_error(404, 'Not Found')
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.path in host.cut:  # half the data, then close
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class Host:
    """The loopback server: ``serve`` a file at a path, read ``requests``."""

    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                                     _Handler)
        self.httpd.files: Dict[str, bytes] = {}
        self.httpd.requests: List[str] = []
        self.httpd.cut: Set[str] = set()
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       daemon=True)
        self.thread.start()

    @property
    def requests(self) -> List[str]:
        return self.httpd.requests

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.httpd.server_port}{path}'

    def serve(self, path: str, obj: Any = None, data: bytes = None) -> str:
        if data is None:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            data = buffer.getvalue()
        self.httpd.files[path] = data
        return self.url(path)

    def cut(self, path: str) -> None:
        self.httpd.cut.add(path)


@pytest.fixture
def host(tmp_path, monkeypatch):
    """The server, torch.hub's cache under ``tmp_path/torch`` and the
    working directory ``tmp_path`` (so ``data/pretrained/`` is empty)."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    for proxy in ('http_proxy', 'HTTP_PROXY'):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    monkeypatch.chdir(tmp_path)
    server = Host()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def cache_dir(tmp_path) -> str:
    return str(tmp_path / 'torch' / 'hub' / 'checkpoints')


def imagenet_file(arch: dict = TINY_MILA) -> Dict[str, Any]:
    """An ImageNet-style release of a MILA arch: ``model`` with a
    classifier, no output norms; seeded, so two calls give equal files."""
    torch.manual_seed(0)
    state = {k: v for k, v in MILA(arch).state_dict().items()
             if not k.startswith(('norm0', 'norm1', 'norm2', 'norm3'))}
    state['head.weight'] = torch.randn(1000, 128)
    state['head.bias'] = torch.randn(1000)
    return {'model': state, 'epoch': 300}


def init_from(url: str) -> MILA:
    torch.manual_seed(1)  # another draw than the file's
    model = MILA(TINY_MILA, init_cfg=dict(type='Pretrained', checkpoint=url))
    model.init_weights()
    return model


def assert_holds(model: MILA, checkpoint: Dict[str, Any]) -> None:
    own = model.state_dict()
    shared = [k for k in checkpoint['model'] if k in own]
    assert len(shared) == len(own) - 8  # all but the output norms
    for key in shared:
        assert torch.equal(own[key], checkpoint['model'][key]), key


# ------------------------------------------------------------- training
@pytest.mark.parametrize('path, name', [
    (TSINGHUA_PATH, 'MLLA_T.pth'),
    (GITHUB_PATH, 'vssm1_tiny_0230s_ckpt_epoch_264.pth')],
    ids=['tsinghua-like', 'github-like'])
def test_init_through_address_downloads_once(path, name, host, tmp_path,
                                             monkeypatch):
    """The first init downloads the file into torch.hub's cache under its
    official name (the table's, for a link that names none); the second
    makes no request and loads the same tensors."""
    checkpoint = imagenet_file()
    url = host.serve(path, checkpoint)
    if path == TSINGHUA_PATH:
        monkeypatch.setitem(OFFICIAL_FILES, url, name)
    assert_holds(init_from(url), checkpoint)
    assert host.requests == [path]
    assert os.listdir(cache_dir(tmp_path)) == [name]
    assert_holds(init_from(url), checkpoint)
    assert host.requests == [path]  # the cache, no second request


def test_address_without_file_name_and_not_in_table_is_refused(host):
    url = host.serve('/f/0123456789abcdef/?dl=1', imagenet_file())
    with pytest.raises(ValueError, match='names no file') as info:
        init_from(url)
    assert f"'{url}#model.pth'" in str(info.value)
    assert host.requests == []
    # with a fragment it has a name (the fragment is not sent)
    assert_holds(init_from(url + '#MLLA_T.pth'), imagenet_file())
    assert host.requests == ['/f/0123456789abcdef/?dl=1']


@pytest.mark.parametrize('failure', ['cut', 'missing', 'html'])
def test_failed_download_leaves_nothing_and_names_the_way_out(
        failure, host, tmp_path, monkeypatch):
    """A transfer cut half-way, a 404 and an HTML page: no file in the
    cache (not even a partial one), and a message naming the address and
    the local path to put a copy at; a copy put there then loads without a
    request."""
    checkpoint = imagenet_file()
    url = host.url(GITHUB_PATH)
    if failure == 'cut':
        host.serve(GITHUB_PATH, checkpoint)
        host.cut(GITHUB_PATH)
        reason = 'the transfer stopped after'
    elif failure == 'html':
        host.serve(GITHUB_PATH, data=b'<html><body>Sign in</body></html>')
        reason = 'the server sent something that is not a torch'
    else:
        reason = 'HTTP 404'
    with pytest.raises(DownloadError) as info:
        init_from(url)
    message = str(info.value)
    local = str(tmp_path / 'data' / 'pretrained' /
                'vssm1_tiny_0230s_ckpt_epoch_264.pth')
    assert message.startswith(f'could not download {url} ({reason}')
    assert f'put it at {local}' in message
    assert os.listdir(cache_dir(tmp_path)) == []
    assert host.requests == [GITHUB_PATH]
    os.makedirs(osp.dirname(local))
    torch.save(checkpoint, local)
    assert_holds(init_from(url), checkpoint)
    assert host.requests == [GITHUB_PATH]


def test_local_copy_wins_over_the_address(host, tmp_path, monkeypatch):
    local_file = imagenet_file()
    os.makedirs('data/pretrained')
    torch.save(local_file, 'data/pretrained/MLLA_T.pth')
    url = host.serve(TSINGHUA_PATH, imagenet_file(OTHER_TINY))
    monkeypatch.setitem(OFFICIAL_FILES, url, 'MLLA_T.pth')
    assert_holds(init_from(url), local_file)
    assert host.requests == []
    assert not osp.exists(cache_dir(tmp_path))


def test_file_of_another_arch_by_address_is_refused(host, monkeypatch):
    url = host.serve(TSINGHUA_PATH, imagenet_file(OTHER_TINY))
    monkeypatch.setitem(OFFICIAL_FILES, url, 'MLLA_T.pth')
    with pytest.raises(CheckpointError) as info:
        init_from(url)
    message = str(info.value)
    assert message.startswith(f'{url} does not fit this MILA (a custom '
                              'arch):')
    assert 'of another shape' in message and 'strict=False' in message


@pytest.mark.parametrize('address, lookup', [
    ('open-mmlab://resnet50_v1c', 'get_external_models'),
    ('torchvision://resnet50', 'get_torchvision_models')])
def test_named_models_resolve_to_an_address_loaded_the_same_way(
        address, lookup, host, tmp_path, monkeypatch):
    """``open-mmlab://`` and ``torchvision://`` names go through MMEngine's
    model lists to an address, then the same cache and weights-only load
    (the file served is a MILA one: what matters is the route)."""
    import mmengine.runner.checkpoint as mmengine_checkpoint
    checkpoint = imagenet_file()
    url = host.serve('/models/resnet50-0676ba61.pth', checkpoint)
    name = address.split('://')[1]
    monkeypatch.setattr(mmengine_checkpoint, lookup, lambda: {name: url})
    assert_holds(init_from(address), checkpoint)
    assert host.requests == ['/models/resnet50-0676ba61.pth']
    assert os.listdir(cache_dir(tmp_path)) == ['resnet50-0676ba61.pth']


# ------------------------------------------------------------ pre-flight
def _job_cfg(url: str, data_root: str) -> Config:
    return Config(dict(
        model=dict(backbone=dict(type='MILA', init_cfg=dict(
            type='Pretrained', checkpoint=url))),
        train_dataloader=dict(dataset=dict(
            data_root=data_root, ann_file='annotations/train.json',
            data_prefix=dict(img='train/')))))


def test_preflight_reports_data_and_weights_together(host, tmp_path,
                                                     monkeypatch):
    """No data: one message, the data first, then the address and the
    local path, with no request. Data present: the download happens in the
    pre-flight (once), or its failure is the message."""
    url = host.url(TSINGHUA_PATH)
    monkeypatch.setitem(OFFICIAL_FILES, url, 'MLLA_T.pth')
    cfg = _job_cfg(url, str(tmp_path / 'coco') + '/')
    with pytest.raises(FileNotFoundError) as info:
        check_inputs(cfg, splits=('train_dataloader', ))
    message = str(info.value)
    assert message.startswith('dataset files not found')
    assert url in message
    assert str(tmp_path / 'data' / 'pretrained' / 'MLLA_T.pth') in message
    assert message.index('dataset files') < message.index(url)
    assert host.requests == []

    os.makedirs(tmp_path / 'coco' / 'train')
    (tmp_path / 'coco' / 'annotations').mkdir()
    (tmp_path / 'coco' / 'annotations' / 'train.json').write_text('{}')
    with pytest.raises(FileNotFoundError) as info:  # the host refuses
        check_inputs(cfg, splits=('train_dataloader', ))
    assert str(info.value).startswith(
        f'pretrained backbone checkpoint: could not download {url} (HTTP 404')
    assert host.requests == [TSINGHUA_PATH]
    host.serve(TSINGHUA_PATH, imagenet_file())
    check_inputs(cfg, splits=('train_dataloader', ))
    assert os.listdir(cache_dir(tmp_path)) == ['MLLA_T.pth']
    check_inputs(cfg, splits=('train_dataloader', ))
    assert host.requests == [TSINGHUA_PATH] * 2


# ------------------------------------------------ detector checkpoints
def test_detector_checkpoint_by_address_tools_test_and_inferencer(
        host, tmp_path):
    """A checkpoint as MMEngine's runner writes it (``meta`` with the
    dataset's classes, the message hub's buffers with numpy inside) served
    at a release-like address: ``tools/test.py CONFIG URL`` downloads it
    once and evaluates; ``DetInferencer(weights=URL)`` then reads the cache
    (no request) and gets the weights and classes, weights only."""
    from mmdet.apis import DetInferencer
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.logging import MessageHub

    from mila_det.datasets import make_shapes_coco

    data_root = str(tmp_path / 'shapes') + '/'
    make_shapes_coco(data_root, num_train=2, num_val=2, size=96, seed=1)
    cfg = narrow_heads(tiny_detector_cfg('mask_rcnn_mila_t_1x.py',
                                          data_root, str(tmp_path / 'work'),
                                          image_size=96), width=16)
    cfg_path = str(tmp_path / 'cfg.py')
    cfg.dump(cfg_path)
    register_all_modules()
    torch.manual_seed(0)
    state = MODELS.build(cfg.model).state_dict()
    hub = MessageHub.get_instance('weights_by_address')
    hub.update_scalar('train/loss', 0.5)
    classes = ('rectangle', 'ellipse', 'triangle')
    url = host.serve(DETECTOR_PATH, {
        'meta': dict(epoch=1, iter=4, dataset_meta=dict(classes=classes),
                     cfg=cfg.pretty_text),
        'state_dict': state, 'message_hub': hub.state_dict()})

    proc = subprocess.run(
        [sys.executable, osp.join(REPO_ROOT, 'tools/test.py'), cfg_path, url,
         '--work-dir', str(tmp_path / 'work')],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'coco/bbox_mAP' in proc.stdout + proc.stderr
    assert host.requests == [DETECTOR_PATH]
    assert os.listdir(cache_dir(tmp_path)) == ['mask_rcnn_tiny_epoch_1.pth']

    inferencer = DetInferencer(model=cfg_path, weights=url, device='cpu')
    assert host.requests == [DETECTOR_PATH]
    assert inferencer.model.dataset_meta['classes'] == classes
    for key, value in inferencer.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    image = osp.join(data_root, 'val', sorted(os.listdir(
        osp.join(data_root, 'val')))[0])
    result = inferencer(image, return_datasamples=True)
    assert result['predictions'][0].pred_instances.bboxes.shape[1] == 4


def test_an_address_whose_query_picks_the_file_needs_a_name():
    # Two such addresses would share one cache name ('uc') otherwise.
    with pytest.raises(ValueError, match='names no file'):
        file_name('https://example.org/uc?export=download&id=AAA')
    assert file_name('https://example.org/uc?id=AAA#a.pth') == 'a.pth'
