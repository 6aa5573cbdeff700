"""Can this GPU machine compile mmcv's CUDA ops for the torch that
``tools/setup_env.sh`` installs? Asked before any long download or build.

    python3 tools/cuda_toolchain.py check --torch-version 2.13.0 \
        [--torch-index URL] [--venv-python .venv/bin/python]
    python3 tools/cuda_toolchain.py arch-list

``check`` finds ``nvcc`` (``$CUDA_HOME``, ``$CUDA_PATH``, ``PATH``, then
/usr/local/cuda*, /opt/cuda*, or the colon-separated folder globs of
``$MILA_DET_CUDA_PREFIXES`` instead of those), reads its CUDA release and compares it with
the CUDA version of the torch build: the torch already in the virtual
environment when there is one, else the CUDA version named by the index URL
or the version's ``+cuXYZ`` tag, else PyPI's default for that torch release
(``PYPI_TORCH_CUDA``). PyTorch's extension builder refuses a toolkit of
another CUDA *major* version, so that stops the set-up; another *minor*
version is a warning. It also checks that the driver can run that CUDA
major and that nvcc can compile for the local GPUs. On success it prints
the CUDA_HOME to build with (nothing when mmcv 2.1.0 with CUDA ops is
already installed, or no GPU is visible); on failure it prints what was
found, what is needed and how to get it, and exits with 1.

``arch-list`` prints ``TORCH_CUDA_ARCH_LIST`` for the local GPUs, from
``nvidia-smi --query-gpu=compute_cap``: each compute capability once, the
highest with ``+PTX`` so that a cached build still runs on a newer GPU.

Standard library only: it runs under the system Python before the virtual
environment exists.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

# CUDA version of the default (PyPI) Linux x86_64 wheel of each torch
# release. 2.7 to 2.14 were read from the wheels' dependency metadata on
# PyPI (nvidia-cuda-runtime-cu12 / cuda-toolkit pins); the older ones are
# PyTorch's published defaults. A release not listed is checked only once
# torch is installed (torch.version.cuda).
PYPI_TORCH_CUDA: Dict[Tuple[int, int], str] = {
    (2, 0): '11.7', (2, 1): '12.1', (2, 2): '12.1', (2, 3): '12.1',
    (2, 4): '12.1', (2, 5): '12.4', (2, 6): '12.4', (2, 7): '12.6',
    (2, 8): '12.8', (2, 9): '12.8', (2, 10): '12.8', (2, 11): '13.0',
    (2, 12): '13.0', (2, 13): '13.0', (2, 14): '13.0'}
NVCC_PREFIXES = ('/usr/local/cuda', '/usr/local/cuda-*', '/opt/cuda',
                 '/opt/cuda-*', '/usr/lib/cuda')
TAG = '[setup_env]'
TORCH_WHL = 'https://download.pytorch.org/whl'


class ToolchainError(RuntimeError):
    """The machine cannot build mmcv's CUDA ops as set up; the message says
    what was found, what is needed and how to get it."""


class Toolchain(NamedTuple):
    nvcc: str            # path of the nvcc to build with
    cuda_home: str       # the toolkit folder holding bin/nvcc
    nvcc_cuda: str       # its CUDA release, e.g. '13.0'
    torch_cuda: str      # the torch build's CUDA version
    torch_source: str    # where torch_cuda came from, for messages
    warnings: List[str]


def _run(cmd: Sequence[str]) -> Optional[str]:
    """stdout of ``cmd``, or None when it is missing or fails."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def gpu_visible() -> bool:
    """True when ``nvidia-smi -L`` lists a GPU (the same test as
    setup_env.sh's)."""
    return shutil.which('nvidia-smi') is not None and \
        _run(['nvidia-smi', '-L']) is not None


def local_gpus() -> List[Tuple[str, str]]:
    """(name, compute capability) of every visible GPU, from nvidia-smi;
    empty when the driver does not report compute_cap (before R510)."""
    out = _run(['nvidia-smi', '--query-gpu=name,compute_cap',
                '--format=csv,noheader'])
    gpus = []
    for line in (out or '').splitlines():
        name, _, cap = line.rpartition(',')
        if re.fullmatch(r'\d+\.\d+', cap.strip()):
            gpus.append((name.strip(), cap.strip()))
    return gpus


def arch_list(caps: Sequence[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for these compute capabilities: each once, in
    order, the highest with +PTX; '' for none."""
    unique = sorted(set(caps), key=lambda c: tuple(map(int, c.split('.'))))
    if not unique:
        return ''
    return ';'.join(unique[:-1] + [unique[-1] + '+PTX'])


def driver_cuda() -> Optional[str]:
    """The newest CUDA version the driver runs, from nvidia-smi's header."""
    match = re.search(r'CUDA Version:\s*(\d+\.\d+)',
                      _run(['nvidia-smi']) or '')
    return match.group(1) if match else None


def _major(version: str) -> int:
    return int(version.split('.')[0])


def nvcc_release(nvcc: str) -> Optional[str]:
    """'12.4' from ``nvcc --version`` ("Cuda compilation tools, release
    12.4, V12.4.131"), or None when it does not run."""
    match = re.search(r'release (\d+\.\d+)', _run([nvcc, '--version']) or '')
    return match.group(1) if match else None


def nvcc_arches(nvcc: str) -> Optional[List[str]]:
    """Compute capabilities nvcc compiles for ('9.0', ...), from
    ``nvcc --list-gpu-arch`` (CUDA 11.0+); None when it cannot say."""
    out = _run([nvcc, '--list-gpu-arch'])
    if out is None:
        return None
    return [f'{m[:-1]}.{m[-1]}' for m in re.findall(r'compute_(\d+)', out)]


def nvcc_candidates(env: Optional[Dict[str, str]] = None,
                    prefixes: Sequence[str] = NVCC_PREFIXES) -> List[str]:
    """Every nvcc to consider, in order. With CUDA_HOME (or CUDA_PATH) set
    only that one: PyTorch's extension builder takes the toolkit from it."""
    env = os.environ if env is None else env
    for var in ('CUDA_HOME', 'CUDA_PATH'):
        if env.get(var):
            return [os.path.join(env[var], 'bin', 'nvcc')]
    found = []
    on_path = shutil.which('nvcc', path=env.get('PATH', ''))
    if on_path:
        found.append(on_path)
    for pattern in prefixes:
        for prefix in sorted(glob.glob(pattern), reverse=True):
            nvcc = os.path.join(prefix, 'bin', 'nvcc')
            if os.access(nvcc, os.X_OK) and \
                    os.path.realpath(nvcc) not in map(os.path.realpath, found):
                found.append(nvcc)
    return found


def _toolkit_of(nvcc: str) -> str:
    """The toolkit folder of an nvcc (through links: /usr/bin/nvcc ->
    /usr/local/cuda-12.4/bin/nvcc gives /usr/local/cuda-12.4)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _cuda_tag(text: str) -> Optional[str]:
    """'12.1' from a 'cu121' in an index URL or a '+cu121' version tag;
    'cpu' for a CPU index or tag."""
    match = re.search(r'(?:^|[/+])cu(\d+)(\d)(?:$|[/])', text.strip())
    if match:
        return f'{int(match.group(1))}.{match.group(2)}'
    if re.search(r'(?:^|[/+])cpu(?:$|[/])', text.strip()):
        return 'cpu'
    return None


def _venv_probe(python: str) -> Optional[dict]:
    """torch's CUDA version and whether mmcv 2.1.0 with CUDA ops imports,
    in the virtual environment's Python; None without torch there."""
    code = '''
import torch
print('torch', torch.__version__, torch.version.cuda)
try:
    import mmcv
    from mmcv.ops import get_compiling_cuda_version
    ok = (mmcv.__version__ == '2.1.0'
          and get_compiling_cuda_version() != 'not available')
except Exception:
    ok = False
print('mmcv_cuda', ok)
'''
    if not (python and os.access(python, os.X_OK)):
        return None
    out = _run([python, '-c', code])
    if out is None:
        return None
    fields = dict(line.split(' ', 1) for line in out.splitlines()
                  if line.startswith(('torch ', 'mmcv_cuda ')))
    if 'torch' not in fields:
        return None
    version, cuda = fields['torch'].split(' ')
    return dict(torch=version, cuda=None if cuda == 'None' else cuda,
                mmcv_cuda=fields.get('mmcv_cuda') == 'True')


def torch_cuda(torch_version: str, index: str = '',
               installed: Optional[dict] = None
               ) -> Tuple[Optional[str], str]:
    """(CUDA version of the torch build, where that was read). The version
    is 'cpu' for a CPU build and None when it is known only after
    installing."""
    if installed is not None:
        return (installed['cuda'] or 'cpu',
                f'torch {installed["torch"]} in the virtual environment')
    for text, what in ((index, f'the index {index}'),
                       (torch_version, f'torch {torch_version}')):
        tag = _cuda_tag(text) if text else None
        if tag:
            return tag, f'torch {torch_version} from {what}'
    if not index:
        match = re.match(r'(\d+)\.(\d+)', torch_version)
        key = (int(match.group(1)), int(match.group(2))) if match else None
        if key in PYPI_TORCH_CUDA:
            return (PYPI_TORCH_CUDA[key],
                    f"torch {torch_version}'s PyPI build")
    return None, f'torch {torch_version}'


def _how(need: str, torch_version: str, have: Optional[str]) -> str:
    """The ways out, as message lines."""
    lines = [
        '  how to get it, either:',
        f'    - a CUDA {need} toolkit: on a cluster `module avail cuda` then '
        f'`module load cuda/{need}`; elsewhere NVIDIA\'s installer '
        '(developer.nvidia.com/cuda-toolkit-archive) or '
        f'`conda install -c nvidia cuda-toolkit={need}`; if it is '
        'installed where it is not found, set CUDA_HOME=/path/to/cuda; then '
        're-run `make env`;']
    if have:
        tag = 'cu' + have.replace('.', '')
        lines.append(
            f'    - or a torch built for the CUDA {have} you have: '
            f'`MILA_DET_TORCH_INDEX={TORCH_WHL}/{tag} make env` (add '
            'MILA_DET_TORCH_VERSION=X.Y.Z if PyTorch publishes no '
            f'{torch_version} for {tag}), after `rm -rf .venv` if it already '
            'holds a torch.')
    else:
        lines.append(
            '    - or a torch built for a CUDA toolkit you can load: '
            f'`MILA_DET_TORCH_INDEX={TORCH_WHL}/cuXYZ '
            '[MILA_DET_TORCH_VERSION=X.Y.Z] make env`.')
    return '\n'.join(lines)


def check(torch_version: str, index: str = '',
          venv_python: Optional[str] = None,
          env: Optional[Dict[str, str]] = None,
          prefixes: Optional[Sequence[str]] = None,
          user_arch_list: Optional[str] = None) -> Optional[Toolchain]:
    """The toolkit to build mmcv's CUDA ops with, for a GPU machine.

    Args:
        torch_version: the torch release setup_env.sh installs
            (MILA_DET_TORCH_VERSION), e.g. '2.13.0' or '2.5.1+cu121'.
        index: the index it comes from (MILA_DET_TORCH_INDEX); '' for
            PyPI. Defaults to ''.
        venv_python: the virtual environment's Python; its torch, when
            installed, decides the CUDA version. Defaults to None.
        env: environment for CUDA_HOME / CUDA_PATH / PATH. Defaults to
            os.environ.
        prefixes: globs of toolkit folders searched after PATH. Defaults
            to $MILA_DET_CUDA_PREFIXES (colon-separated) when set, else
            NVCC_PREFIXES.
        user_arch_list: the user's TORCH_CUDA_ARCH_LIST, if set (then nvcc
            is not checked against the local GPUs).

    Returns:
        None when nothing needs building (no GPU visible, mmcv with CUDA ops
        already installed, or a CPU build of torch chosen on purpose), else
        the Toolchain to build with.

    Raises:
        ToolchainError: with what was found, what is needed and how to get
            it, when the build could not succeed.
    """
    env = os.environ if env is None else env
    if prefixes is None:
        prefixes = NVCC_PREFIXES if env.get('MILA_DET_CUDA_PREFIXES') is None \
            else [p for p in env['MILA_DET_CUDA_PREFIXES'].split(':') if p]
    if not gpu_visible():
        return None
    installed = _venv_probe(venv_python) if venv_python else None
    if installed is not None and installed['mmcv_cuda']:
        return None
    need, source = torch_cuda(torch_version, index, installed)
    gpus = local_gpus()
    gpu_text = ', '.join(f'{n} (compute capability {c})' for n, c in gpus) \
        or 'a GPU (compute capability not reported by this driver)'
    if need == 'cpu':
        if installed is not None:
            raise ToolchainError(
                f'{TAG} cannot set up for the GPU: {source} is a CPU build\n'
                f'  found:  {gpu_text}\n'
                '  needed: a CUDA build of torch, so that mmcv compiles its '
                'CUDA ops and the detector trains on the GPU\n'
                '  how to get it: `rm -rf .venv` and re-run `make env` (with '
                'MILA_DET_TORCH_INDEX if you need a particular CUDA build).')
        return None  # a CPU torch asked for on purpose: nothing CUDA to build
    driver = driver_cuda()
    if need and driver and _major(driver) < _major(need):
        raise ToolchainError(
            f'{TAG} the NVIDIA driver is too old for {source} (CUDA {need})\n'
            f'  found:  {gpu_text}; the driver runs CUDA up to {driver}\n'
            f'  needed: a driver for CUDA {_major(need)}.x, or a torch built '
            f'for CUDA {driver} or older\n'
            f'  how to get it: `MILA_DET_TORCH_INDEX={TORCH_WHL}/cu'
            f'{driver.replace(".", "")} make env` (a toolkit of that version '
            'is then needed too), or ask the administrators for a newer '
            'driver.')
    candidates = nvcc_candidates(env, prefixes)
    releases = [(nvcc, nvcc_release(nvcc)) for nvcc in candidates]
    runnable = [(n, r) for n, r in releases if r]
    if not runnable:
        var = next((v for v in ('CUDA_HOME', 'CUDA_PATH') if env.get(v)),
                   None)
        if var:
            where = f'{var}={env[var]} has no working bin/nvcc'
        else:
            where = 'no nvcc on PATH' + (
                ' or under ' + ', '.join(prefixes) if prefixes else '') + \
                ', and CUDA_HOME is not set'
        needed = (f'nvcc from a CUDA {need} toolkit ({source} uses CUDA '
                  f'{need}; PyTorch\'s extension builder needs the same '
                  'major version)' if need else
                  'nvcc from the CUDA toolkit of the torch build')
        raise ToolchainError(
            f'{TAG} cannot build mmcv\'s CUDA ops: no nvcc found\n'
            f'  found:  {gpu_text}; {where}\n'
            f'  needed: {needed}\n' + _how(need or 'X.Y', torch_version,
                                           None))
    if need is None:  # known once torch is installed: checked again then
        nvcc, have = runnable[0]
        return Toolchain(nvcc, _toolkit_of(nvcc), have, '', source, [])
    matching = [(n, r) for n, r in runnable if _major(r) == _major(need)]
    if not matching:
        found = '; '.join(f'nvcc {r} at {n}' for n, r in runnable)
        raise ToolchainError(
            f'{TAG} cannot build mmcv\'s CUDA ops: nvcc is CUDA '
            f'{runnable[0][1]}, {source} is CUDA {need}\n'
            f'  found:  {found}\n'
            f'  needed: nvcc from a CUDA {_major(need)}.x toolkit, best '
            f'{need} ({source} uses CUDA {need}; PyTorch\'s extension '
            'builder refuses another major version)\n' +
            _how(need, torch_version, runnable[0][1]))
    exact = [(n, r) for n, r in matching if r == need]
    nvcc, have = (exact or matching)[0]
    warnings = []
    if have != need:
        warnings.append(
            f'{TAG} warning: nvcc {have} ({nvcc}) and {source} (CUDA '
            f'{need}) differ in the minor version; PyTorch builds with it, '
            f'but a CUDA {need} toolkit is the safe choice.')
    supported = nvcc_arches(nvcc)
    caps = sorted({c for _, c in gpus})
    missing = [c for c in caps if supported is not None
               and c not in supported]
    if missing and not user_arch_list:
        raise ToolchainError(
            f'{TAG} nvcc {have} cannot compile for this GPU\n'
            f'  found:  {gpu_text}; {nvcc} compiles for compute capability '
            f'{", ".join(supported)}\n'
            f'  needed: a toolkit that knows compute capability '
            f'{", ".join(missing)}\n' + _how(need, torch_version, None))
    return Toolchain(nvcc, _toolkit_of(nvcc), have, need, source, warnings)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    chk = sub.add_parser('check', help='the toolkit to build mmcv with')
    chk.add_argument('--torch-version', required=True)
    chk.add_argument('--torch-index', default='')
    chk.add_argument('--venv-python')
    sub.add_parser('arch-list', help='TORCH_CUDA_ARCH_LIST of local GPUs')
    args = parser.parse_args(argv)
    if args.command == 'arch-list':
        print(arch_list([c for _, c in local_gpus()]))
        return 0
    try:
        found = check(args.torch_version, args.torch_index, args.venv_python,
                      user_arch_list=os.environ.get('TORCH_CUDA_ARCH_LIST'))
    except ToolchainError as err:
        print(err, file=sys.stderr)
        return 1
    if found is not None:
        for warning in found.warnings:
            print(warning, file=sys.stderr)
        print(f'{TAG} nvcc {found.nvcc_cuda} at {found.nvcc} '
              + (f'matches {found.torch_source} (CUDA {found.torch_cuda})'
                 if found.torch_cuda else
                 f'(the CUDA of {found.torch_source} is checked once it '
                 'is installed)'), file=sys.stderr)
        print(found.cuda_home)
    return 0


if __name__ == '__main__':
    sys.exit(main())
