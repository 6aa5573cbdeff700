"""keep_freed_memory: freed activations stay in the process for reuse."""
import os
import subprocess
import sys

import pytest

PROBE = '''
import sys, torch
from mila_det.utils.malloc import keep_freed_memory

def rss_mib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20

applied = keep_freed_memory()
x = torch.ones(50_000_000)  # 190 MiB, every page touched
before = rss_mib()
del x
print(applied, round(before - rss_mib()))
'''


def run_probe(env_value):
    env = {'MILA_DET_MALLOC': env_value} if env_value else {}
    out = subprocess.run([sys.executable, '-c', PROBE], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, **env})
    applied, released = out.stdout.split()
    return applied == 'True', int(released)


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc behaviour (the CI and dev machines run it)')
def test_freed_blocks_are_kept_and_opt_out_restores_default():
    applied, released = run_probe(None)
    assert applied and released < 20  # kept for the next allocation
    applied, released = run_probe('default')
    assert not applied and released > 150  # unmapped at once, as glibc does
