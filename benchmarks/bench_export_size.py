"""What an export weighs: train a shipped recipe briefly through the CLI, export it, and break the adapter file
down by what it holds (LoRA matrices, fully trained modules, each counted once per name it is saved under).

    python benchmarks/bench_export_size.py                      # quickstart, 2 steps, CPU
    python benchmarks/bench_export_size.py --recipe sinklora-smollm2-16k --steps 1

The size does not depend on how long the run trains, so a couple of steps measure it. One JSON line goes to
benchmarks/results/export.jsonl with the machine, the command and the date. SmolLM2 ties its output head to its
input embedding; a recipe that trains the embedding (SinkLoRA's LoRA+, `train_embeddings_and_norms`) saves the
trained matrix under both names, `embed_tokens` and `lm_head` (PEFT's format: its loader needs a tensor for each),
which `tied_copies` counts.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_io import emit_row, utc_now  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "export.jsonl"


def adapter_breakdown(path: Path) -> dict:
    """Bytes of `adapter_model.safetensors` by kind of tensor, its dtypes, and how many names hold an embedding
    matrix (vocab x hidden)."""
    kinds: dict[str, int] = defaultdict(int)
    dtypes: set[str] = set()
    shapes: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    with safe_open(str(path), framework="pt") as st:
        for name in st.keys():
            t = st.get_tensor(name)
            size = t.numel() * t.element_size()
            kind = "lora" if ".lora_" in name else ("embedding" if ("embed_tokens" in name or "lm_head" in name) else
                                                   "other")
            kinds[kind] += size
            dtypes.add(str(t.dtype).removeprefix("torch."))
            shapes[kind].append(tuple(t.shape))
    return {"file_bytes": path.stat().st_size, "lora_bytes": kinds["lora"], "embedding_bytes": kinds["embedding"],
            "other_bytes": kinds["other"], "embedding_names": len(shapes["embedding"]),
            "tied_copies": len(shapes["embedding"]) if len(set(shapes["embedding"])) == 1 else None,
            "dtypes": sorted(dtypes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="quickstart")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results file ('' to print only)")
    p.add_argument("--machine", default=None, help="what ran it (default: CPU model and core count)")
    args = p.parse_args(argv)
    command = "python benchmarks/bench_export_size.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        for cli in (["train", args.recipe, f"training.max_steps={args.steps}", f"training.save_steps={args.steps}",
                     f"training.output_dir={run}"], ["export", str(run)]):
            subprocess.run([sys.executable, "-m", "headwise", *cli], check=True)
        row = {"recipe": args.recipe, "steps": args.steps, **adapter_breakdown(run / "export" / "adapter_model.safetensors"),
               "command": command.strip(), "date": utc_now(),
               "machine": args.machine or f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"}
    emit_row(row, args.out or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
