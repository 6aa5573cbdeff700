"""tools/cuda_toolchain.py and the GPU branch of tools/setup_env.sh, on a
machine without a GPU: a fake ``nvidia-smi`` and fake ``nvcc`` (small shell
scripts in tmp_path, put on PATH) stand for the GPU machine's."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import load_tool

TOOL = REPO_ROOT / 'tools' / 'cuda_toolchain.py'
SETUP = REPO_ROOT / 'tools' / 'setup_env.sh'



tc = load_tool(TOOL)


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\n' + body)
    path.chmod(0o755)
    return path


def fake_nvidia_smi(bin_dir: Path, caps=('9.0', '9.0'),
                    driver_cuda: str = '13.0') -> Path:
    """Answers ``-L``, the compute_cap query and the plain header."""
    gpus = ''.join(f'echo "NVIDIA Fake GPU {i}, {c}"\n'
                   for i, c in enumerate(caps))
    return _script(bin_dir / 'nvidia-smi', f'''case "$*" in
  -L) echo "GPU 0: NVIDIA Fake GPU (UUID: GPU-0)" ;;
  *--query-gpu=name,compute_cap*)
{gpus}    ;;
  "") echo "| NVIDIA-SMI 580.00  Driver Version: 580.00  CUDA Version: {driver_cuda} |" ;;
  *) exit 6 ;;
esac
''')


def fake_toolkit(root: Path, release: str,
                 arches=('75', '80', '86', '89', '90', '100')) -> Path:
    """A folder with bin/nvcc that reports ``release``; returns the folder."""
    listing = ''.join(f'echo compute_{a}\n' for a in arches)
    _script(root / 'bin' / 'nvcc', f'''case "$1" in
  --version) echo "nvcc: NVIDIA (R) Cuda compiler driver"
             echo "Cuda compilation tools, release {release}, V{release}.99" ;;
  --list-gpu-arch)
{listing}    ;;
  *) exit 1 ;;
esac
''')
    return root


@pytest.fixture
def gpu_path(tmp_path, monkeypatch):
    """PATH with only a fake nvidia-smi (9.0 GPUs, driver for CUDA 13.0);
    tests add toolkits. CUDA_HOME / CUDA_PATH unset."""
    bin_dir = tmp_path / 'bin'
    fake_nvidia_smi(bin_dir)
    monkeypatch.setenv('PATH', str(bin_dir))
    monkeypatch.delenv('CUDA_HOME', raising=False)
    monkeypatch.delenv('CUDA_PATH', raising=False)
    return bin_dir


def test_no_gpu_means_nothing_to_check(tmp_path, monkeypatch):
    monkeypatch.setenv('PATH', str(tmp_path))  # no nvidia-smi at all
    assert not tc.gpu_visible()
    assert tc.check('2.13.0', prefixes=()) is None


def test_absent_nvcc_says_what_is_needed_and_how(gpu_path):
    with pytest.raises(tc.ToolchainError) as err:
        tc.check('2.13.0', prefixes=())
    msg = str(err.value)
    assert 'no nvcc found' in msg
    assert 'NVIDIA Fake GPU 0 (compute capability 9.0)' in msg
    # torch 2.13.0's PyPI build is CUDA 13.0 (from the table)
    assert "torch 2.13.0's PyPI build uses CUDA 13.0" in msg
    assert 'module load cuda/13.0' in msg and 'CUDA_HOME=' in msg
    assert 'MILA_DET_TORCH_INDEX=' in msg


def test_wrong_major_names_both_versions(gpu_path, tmp_path):
    toolkit = fake_toolkit(tmp_path / 'cuda-12.4', '12.4')
    os.symlink(toolkit / 'bin' / 'nvcc', gpu_path / 'nvcc')
    with pytest.raises(tc.ToolchainError) as err:
        tc.check('2.13.0', prefixes=())
    msg = str(err.value)
    assert 'nvcc is CUDA 12.4' in msg and 'is CUDA 13.0' in msg
    assert f'nvcc 12.4 at {gpu_path / "nvcc"}' in msg
    # the other way out: a torch built for the local 12.4
    assert 'MILA_DET_TORCH_INDEX=https://download.pytorch.org/whl/cu124' \
        in msg
    assert 'module load cuda/13.0' in msg


def test_matching_nvcc_passes_and_gives_its_cuda_home(gpu_path, tmp_path):
    old = fake_toolkit(tmp_path / 'opt' / 'cuda-12.4', '12.4')
    new = fake_toolkit(tmp_path / 'opt' / 'cuda-13.0', '13.0')
    os.symlink(old / 'bin' / 'nvcc', gpu_path / 'nvcc')  # PATH: the wrong one
    found = tc.check('2.13.0', prefixes=(str(tmp_path / 'opt' / 'cuda-*'),))
    assert found.nvcc == str(new / 'bin' / 'nvcc')  # the prefix's matches
    assert (found.cuda_home, found.nvcc_cuda, found.torch_cuda) == \
        (str(new), '13.0', '13.0')
    assert found.warnings == []


def test_cuda_home_is_the_only_candidate(gpu_path, tmp_path, monkeypatch):
    """PyTorch's builder takes the toolkit from CUDA_HOME, so a matching nvcc
    elsewhere does not help when CUDA_HOME names another."""
    fake_toolkit(tmp_path / 'good', '13.0')
    os.symlink(tmp_path / 'good' / 'bin' / 'nvcc', gpu_path / 'nvcc')
    monkeypatch.setenv('CUDA_HOME', str(fake_toolkit(tmp_path / 'c12',
                                                     '12.8')))
    with pytest.raises(tc.ToolchainError, match='nvcc is CUDA 12.8'):
        tc.check('2.13.0', prefixes=())
    monkeypatch.setenv('CUDA_HOME', str(tmp_path / 'empty'))
    with pytest.raises(tc.ToolchainError, match='no nvcc found') as err:
        tc.check('2.13.0', prefixes=())
    assert 'CUDA_HOME' in str(err.value)


def test_other_minor_is_a_warning(gpu_path, tmp_path):
    fake_toolkit(tmp_path / 'cuda', '12.4')
    os.symlink(tmp_path / 'cuda' / 'bin' / 'nvcc', gpu_path / 'nvcc')
    found = tc.check('2.9.1', prefixes=())  # PyPI build: CUDA 12.8
    assert found.torch_cuda == '12.8' and found.nvcc_cuda == '12.4'
    assert len(found.warnings) == 1
    assert 'nvcc 12.4' in found.warnings[0] and '12.8' in found.warnings[0]


def test_nvcc_that_cannot_compile_for_the_gpu(gpu_path, tmp_path,
                                               monkeypatch):
    fake_toolkit(tmp_path / 'cuda', '13.0', arches=('75', '80', '86'))
    os.symlink(tmp_path / 'cuda' / 'bin' / 'nvcc', gpu_path / 'nvcc')
    with pytest.raises(tc.ToolchainError, match='cannot compile for this '
                       'GPU') as err:
        tc.check('2.13.0', prefixes=())
    assert 'compute capability 9.0' in str(err.value)
    # the user's own TORCH_CUDA_ARCH_LIST is theirs to answer for
    assert tc.check('2.13.0', prefixes=(), user_arch_list='8.0') is not None


def test_driver_older_than_the_torch_build(tmp_path, monkeypatch):
    bin_dir = tmp_path / 'bin'
    fake_nvidia_smi(bin_dir, driver_cuda='12.2')
    fake_toolkit(tmp_path / 'cuda', '13.0')
    os.symlink(tmp_path / 'cuda' / 'bin' / 'nvcc', bin_dir / 'nvcc')
    monkeypatch.setenv('PATH', str(bin_dir))
    with pytest.raises(tc.ToolchainError, match='driver is too old') as err:
        tc.check('2.13.0', prefixes=())
    assert 'up to 12.2' in str(err.value) and 'cu122' in str(err.value)


@pytest.mark.parametrize('version, index, want', [
    ('2.13.0', '', '13.0'),
    ('2.10.0', '', '12.8'),
    ('2.5.1+cu121', '', '12.1'),
    ('2.13.0', 'https://download.pytorch.org/whl/cu126', '12.6'),
    ('2.13.0', 'https://download.pytorch.org/whl/cu130/', '13.0'),
    ('2.13.0', 'https://download.pytorch.org/whl/cpu', 'cpu'),
    ('2.13.0', 'https://mirror.example/simple', None),  # known after install
    ('3.1.0', '', None),
], ids=['pypi-2.13', 'pypi-2.10', 'version-tag', 'index-cu126',
        'index-cu130', 'index-cpu', 'unknown-index', 'unknown-version'])
def test_torch_build_cuda_known_in_advance(version, index, want):
    assert tc.torch_cuda(version, index)[0] == want


def test_unknown_torch_cuda_is_checked_after_install(gpu_path, tmp_path):
    """Not known in advance: any nvcc passes the first check (setup_env.sh
    checks again once torch is installed, from torch.version.cuda)."""
    fake_toolkit(tmp_path / 'cuda', '12.4')
    os.symlink(tmp_path / 'cuda' / 'bin' / 'nvcc', gpu_path / 'nvcc')
    found = tc.check('3.1.0', prefixes=())
    assert found.torch_cuda == '' and found.nvcc_cuda == '12.4'
    installed = dict(torch='3.1.0', cuda='13.2', mmcv_cuda=False)
    assert tc.torch_cuda('3.1.0', '', installed)[0] == '13.2'


def fake_venv_python(path: Path, torch: str, cuda: str,
                     mmcv_cuda: bool) -> str:
    """A 'python' that answers the virtual-environment probe."""
    return str(_script(path, f'echo "torch {torch} {cuda}"\n'
                             f'echo "mmcv_cuda {mmcv_cuda}"\n'))


def test_installed_torch_decides(gpu_path, tmp_path):
    """Once torch is in the environment its own CUDA version counts; a CPU
    build there is an error on a GPU machine; mmcv with CUDA ops already
    there needs no toolkit at all."""
    fake_toolkit(tmp_path / 'cuda', '12.6')
    os.symlink(tmp_path / 'cuda' / 'bin' / 'nvcc', gpu_path / 'nvcc')
    py = fake_venv_python(tmp_path / 'a' / 'python', '2.13.0+cu126', '12.6',
                          False)
    found = tc.check('2.13.0', venv_python=py, prefixes=())
    assert (found.torch_cuda, found.nvcc_cuda) == ('12.6', '12.6')
    assert 'in the virtual environment' in found.torch_source
    py = fake_venv_python(tmp_path / 'b' / 'python', '2.13.0+cpu', 'None',
                          False)
    with pytest.raises(tc.ToolchainError, match='is a CPU build'):
        tc.check('2.13.0', venv_python=py, prefixes=())
    py = fake_venv_python(tmp_path / 'c' / 'python', '2.13.0', '13.0', True)
    assert tc.check('2.13.0', venv_python=py, prefixes=()) is None
    # no environment yet: the pinned version's PyPI build (13.0) counts
    with pytest.raises(tc.ToolchainError, match='is CUDA 13.0'):
        tc.check('2.13.0', venv_python=str(tmp_path / 'none' / 'python'),
                 prefixes=())


def test_prefixes_from_the_environment(gpu_path, tmp_path, monkeypatch):
    fake_toolkit(tmp_path / 'sw' / 'cuda-13.0', '13.0')
    monkeypatch.setenv('MILA_DET_CUDA_PREFIXES',
                       f'{tmp_path}/nothing:{tmp_path}/sw/cuda-*')
    assert tc.check('2.13.0').cuda_home == str(tmp_path / 'sw' / 'cuda-13.0')


def test_arch_list_of_local_gpus(gpu_path, capsys):
    assert tc.arch_list(['9.0', '8.0', '9.0', '10.0']) == '8.0;9.0;10.0+PTX'
    assert tc.arch_list([]) == ''
    assert tc.main(['arch-list']) == 0
    assert capsys.readouterr().out.strip() == '9.0+PTX'  # two 9.0 GPUs


def test_command_line_prints_cuda_home_or_the_message(gpu_path, tmp_path,
                                                      capsys, monkeypatch):
    monkeypatch.setenv('MILA_DET_CUDA_PREFIXES', '')  # hide real toolkits
    assert tc.main(['check', '--torch-version', '2.13.0']) == 1
    assert 'no nvcc found' in capsys.readouterr().err
    fake_toolkit(tmp_path / 'cuda', '13.0')
    os.symlink(tmp_path / 'cuda' / 'bin' / 'nvcc', gpu_path / 'nvcc')
    capsys.readouterr()
    assert tc.main(['check', '--torch-version', '2.13.0']) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / 'cuda')
    assert 'matches' in out.err


@pytest.mark.skipif(shutil.which('bash') is None, reason='needs bash')
@pytest.mark.parametrize('nvcc', [None, '12.4'], ids=['no-nvcc',
                                                      'wrong-major'])
def test_setup_env_stops_before_any_download(tmp_path, nvcc):
    """The real set-up script, with a fake nvidia-smi: it stops with the
    message before creating the virtual environment (so before downloading
    torch or building mmcv). MILA_DET_VENV keeps the real .venv out of it;
    MILA_DET_CUDA_PREFIXES='' and a PATH without nvcc hide the machine's own
    toolkits (this one has CUDA 13.0 for the offline kernel report)."""
    bin_dir = tmp_path / 'bin'
    fake_nvidia_smi(bin_dir)
    if nvcc:
        fake_toolkit(tmp_path / 'cuda', nvcc)
        os.symlink(tmp_path / 'cuda' / 'bin' / 'nvcc', bin_dir / 'nvcc')
    path = [str(bin_dir)] + [
        d for d in os.environ.get('PATH', '').split(os.pathsep)
        if d and not os.path.exists(os.path.join(d, 'nvcc'))]
    env = {k: v for k, v in os.environ.items()
           if k not in ('CUDA_HOME', 'CUDA_PATH', 'MILA_DET_TORCH_VERSION',
                        'MILA_DET_TORCH_INDEX', 'TORCH_CUDA_ARCH_LIST')}
    venv = tmp_path / 'venv'
    env.update(PATH=os.pathsep.join(path), MILA_DET_VENV=str(venv),
               PYTHON=sys.executable, MILA_DET_CUDA_PREFIXES='')
    proc = subprocess.run(['bash', str(SETUP)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert not venv.exists()
    assert 'installing' not in proc.stdout and 'mmcv 2.1.0' not in \
        proc.stdout
    if nvcc:
        assert 'nvcc is CUDA 12.4' in proc.stderr and 'CUDA 13.0' in \
            proc.stderr
    else:
        assert 'no nvcc found' in proc.stderr
        assert "torch 2.13.0's PyPI build uses CUDA 13.0" in proc.stderr
