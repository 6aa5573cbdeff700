"""CPU-only distributed runs with MMEngine 0.10.

MMEngine's launcher calls ``torch.cuda.set_device`` unconditionally, which
fails on a CPU build of torch. When there is no GPU, the tools start the
gloo process group themselves from torchrun's environment, so MMEngine
finds it initialised and skips that call.
"""
import torch
import torch.distributed as dist


def init_cpu_distributed(launcher: str) -> bool:
    """Start a gloo process group for ``launcher='pytorch'`` on a machine
    without CUDA. Returns True if it did."""
    if launcher != 'pytorch' or torch.cuda.is_available() or \
            dist.is_initialized():
        return False
    dist.init_process_group(backend='gloo')
    return True
