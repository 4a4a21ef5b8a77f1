"""Process hygiene: no vLLM engine outlives the rank that started it.

vLLM's EngineCore and worker processes survive their parent when it dies without
running its exit handlers (os._exit, SIGKILL): they hold the GPUs' memory, and a
restarted rank then finds its GPUs full. torchrun kills each worker's whole process
group when it stops or restarts a group; `terminate_children` is for our own early
exits (and runs without torchrun too).
"""

from __future__ import annotations


def terminate_children(grace_s: float = 5.0) -> int:
    """SIGTERM every descendant process, SIGKILL those still alive after grace_s. Returns how many."""
    try:
        import psutil
    except ImportError:  # no vLLM installed either: nothing was started
        return 0
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
    return len(children)
