"""Where a CUDA memory peak is: the caching allocator's recorded trace (``torch.cuda.memory._record_memory_history``)
replayed to its highest point of allocated bytes, and the blocks alive there summed by the code that allocated them.

    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")   # before the model loads
    ...                                                                                  # the work
    Path("memsites.log").write_text(report(torch.cuda.memory._snapshot()))

A block counts from its ``alloc`` to its ``free_completed`` (the allocator's ``memory_allocated`` counts it so); a block
freed without a recorded allocation (allocated before recording began) is ignored. A site is the innermost frame
outside torch itself (the caller in sdgrpo, TRL, transformers, PEFT, bitsandbytes ... that asked for the memory),
with the innermost frame's function after it (what in torch allocated: ``linear``, ``checkpoint`` ...).
"""

from __future__ import annotations

from collections import defaultdict

SKIPPED = ("/torch/", "<frozen", "/contextlib.py", "/functools.py", "/threading.py")


def site(frames: list[dict]) -> str:
    """``file:line function <- innermost function`` of a block's allocation stack (innermost frame first)."""
    if not frames:
        return "(no stack)"
    inner = frames[0].get("name", "?")
    for f in frames:
        name = f.get("filename", "")
        if not any(s in name for s in SKIPPED):
            short = "/".join(name.split("/")[-2:])
            return f"{short}:{f.get('line')} {f.get('name')} <- {inner}"
    return f"(torch) {frames[0].get('filename', '').split('/')[-1]}:{frames[0].get('line')} {inner}"


def replay(trace: list[dict], stop: int | None = None) -> tuple[int, int, dict]:
    """(peak bytes, index of the event that reached it, blocks alive then {addr: (size, frames)}) over ``trace``,
    or the blocks alive after event ``stop`` where it is given (with that point's bytes)."""
    live: dict[int, tuple[int, list]] = {}
    total = best = 0
    best_at = -1
    for i, e in enumerate(trace):
        action = e["action"]
        if action == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
        elif action == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
        if stop is None and total > best:
            best, best_at = total, i
        if stop is not None and i == stop:
            return total, i, live
    if stop is not None:
        return total, len(trace) - 1, live
    return best, best_at, replay(trace, best_at)[2] if best_at >= 0 else {}


def report(snapshot: dict, top: int = 25, device: int = 0) -> str:
    """The peak of ``snapshot``'s trace (``torch.cuda.memory._snapshot()``), its blocks by site and the largest
    blocks, as text."""
    trace = snapshot["device_traces"][device]
    peak, at, live = replay(trace)
    by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        row = by_site[site(frames)]
        row[0] += size
        row[1] += 1
    gib = 2**30
    lines = [f"peak {peak / gib:.3f} GiB allocated at event {at} of {len(trace)} (blocks alive: {len(live)})",
             "", f"{'GiB':>8} {'blocks':>7}  site"]
    for name, (size, count) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / gib:8.3f} {count:7d}  {name}")
    lines += ["", "largest blocks:"]
    for size, frames in sorted(live.values(), key=lambda v: -v[0])[:15]:
        lines.append(f"{size / gib:8.3f}  {site(frames)}")
    return "\n".join(lines) + "\n"


def blocks(segments: list[dict], label: str, top: int = 20) -> str:
    """The allocated blocks of ``torch.cuda.memory_snapshot()`` (no recording needed) summed by size: a
    ``label`` line with the total, then the sizes holding the most bytes (MiB, count, GiB in all)."""
    sizes: dict[int, int] = defaultdict(int)
    for seg in segments:
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                sizes[b["size"]] += 1
    total = sum(s * n for s, n in sizes.items())
    lines = [f"{label}: {total / 2**30:.3f} GiB in {sum(sizes.values())} blocks"]
    for size, n in sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:top]:
        lines.append(f"  {size / 2**20:10.2f} MiB x {n:4d} = {size * n / 2**30:7.3f} GiB")
    return "\n".join(lines) + "\n"
