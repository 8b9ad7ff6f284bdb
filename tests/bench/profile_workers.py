"""Where a generation worker's start goes (issue 13's two-GPU path): the 8B shape saved to
disk, then workers spawned as ``pipeline.sharding`` spawns them, each stamping the seconds
since the parent started it at every stage (interpreter and unpickling, ``import torch``,
the CUDA context, ``import transformers``, ``load_model``, the engine with its fused
projections, a first short ``engine.run`` with its graph captures) and the parent timing the
exit. One worker alone, then one a GPU at once; the same load in the parent, with CUDA up,
is the baseline.

    python tests/bench/profile_workers.py [--layers 32] [--gpus 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ["started", "torch", "cuda", "transformers", "load_model", "engine", "first run"]


def worker(model_dir: str, device: str, spawned: float, out) -> None:
    """Stamp each stage (seconds since the parent's spawn) and send them back."""
    stamps = {"started": time.time() - spawned}
    import torch

    stamps["torch"] = time.time() - spawned
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    if device.startswith("cuda"):  # a CPU device: a smoke run of this script
        torch.cuda.set_device(device)
    torch.zeros(1, device=device)
    stamps["cuda"] = time.time() - spawned
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    stamps["transformers"] = time.time() - spawned
    from pipeline.engine import DecodeEngine, DecodeRequest, SamplingConfig
    from pipeline.models import load_model

    loaded = load_model(model_dir, device=device)
    sync()
    stamps["load_model"] = time.time() - spawned
    engine = DecodeEngine(loaded, capture=True)
    sync()
    stamps["engine"] = time.time() - spawned
    requests = [DecodeRequest(list(range(10, 60)), seed) for seed in range(8)]
    engine.run(requests, SamplingConfig(max_new_tokens=16, ignore_eos=True))
    sync()
    stamps["first run"] = time.time() - spawned
    out.put((device, stamps, time.time()))


def spawn_workers(model_dir: Path, devices: list[str]) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    spawned = time.time()
    processes = [
        context.Process(target=worker, args=(str(model_dir), device, spawned, out), daemon=True)
        for device in devices
    ]
    for process in processes:
        process.start()
    rows = []
    for _ in processes:
        device, stamps, finished = out.get(timeout=300)
        rows.append({"device": device, **stamps, "finished": finished})
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=30)
    exited = time.time()
    for row in rows:
        row["exit"] = exited - row.pop("finished") + row["first run"]
    return rows


def main() -> None:
    import torch
    from bench_workload import build_model_dir
    from common import card, print_table, save_json

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else lambda: None
    first = "cuda:0" if on_gpu else "cpu"
    many = [f"cuda:{i}" for i in range(args.gpus)] if on_gpu else ["cpu", "cpu"]
    folder = Path(tempfile.mkdtemp(prefix="profile-workers-"))
    model_dir = build_model_dir(folder / "model", args.layers)
    rows = []
    for devices in ([first], many):
        for row in spawn_workers(model_dir, devices):
            rows.append({"workers": len(devices), **row})
            print(rows[-1], flush=True)
    from pipeline.models import load_model

    sync()
    mark = time.perf_counter()
    load_model(str(model_dir), device=first)
    sync()
    baseline = time.perf_counter() - mark
    print(f"card: {card()}; 8B shape, {args.layers} layers")
    print(f"load_model in this process (CUDA up, imports done): {baseline:.2f} s")
    print_table(
        "profile_workers: seconds since spawn at the end of each stage",
        rows,
        ["workers", "device", *STAGES, "exit"],
    )
    save_json("profile_workers.json", {"card": card(), "rows": rows, "in_process": baseline})


if __name__ == "__main__":
    main()
