"""One command for a rare GPU session (issue 10 item 7): what only a GPU can show, in under 8 minutes.

    python -m benchmarks.gpu_check --out gpu_check.json          # also writes gpu_check.md

Sections (each in its own try/except: an error is recorded with a short traceback and the next one runs):
  decode_oom  the untiled 720x480x49 decode of the 2B VAE, made to run out of memory under
              `torch.cuda.set_per_process_memory_fraction`, through `CogVideoXPipeline.decode` so the offloader's
              retry ladder runs: which errors came, did a tiled retry return the video, are the latents intact?
  offload     resident vs sequential on a full-width 2B transformer with fewer layers: same output? peak memory
              against non-block weights + 3 blocks + activations? s/step within 5 % (copies hidden)?
  attention   `fastest_sdpa_backend` at the full 2B shape, three times: a stable winner? its output against the
              memory-efficient kernel's, and each fused kernel's time.
  pinned      a sequential-mode pipeline from a random 2B checkpoint (small T5): page-locked bytes against the
              weight bytes, then one short generation's time and peak memory.
  quantize    a random 2B (small T5) resident in 16 bits, int8 and fp8 (issue 25): the transformer's and T5's
              weight bytes (pass: 8-bit <= 0.55x), s/step and peak memory of a short 720x480x49 generation,
              PSNR of its video against the 16-bit one, and whether the fp8 matmul (torch._scaled_mm) ran.
  compile     `compile_blocks()` over 10 distinct shapes (frames 1..49, batch 1 and 2, three sizes), each two steps
              of the pipeline's `denoise`, so traced and run under the attention kernel the pipeline picks:
              failures, graphs compiled, first and later step times.
  v15         CogVideoX1.5-5B itself (issue 23), only when its weights are already downloaded (else skipped with
              a line): per memory mode one clip of 2 steps at 1360x768x81 (benchmarks/gpu_v15.py); run it alone,
              `--sections v15 --budget-s 540`, as it needs most of a call's time.

Random weights only (nothing is downloaded). `--budget-s` skips the sections left once it is spent; results are
written after every section, so a run cut short still leaves its JSON and markdown. Wall time: a section is stopped
at its cap (SECTION_CAPS) or OVERRUN_S past the budget, so the default run ends within 420 + 30 s of sections plus
start-up (imports, device query): under 8 minutes on one GPU. On a CPU, `--tiny` runs every
section at toy sizes and records what needs CUDA as skipped (the smoke test's mode).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import GiB, machine, markdown_table, source_digest
from benchmarks.gpu_helpers import SectionTimeout, error_record, free_memory, is_cuda, jsonable, short_error
from benchmarks.gpu_sections import CHECKS  # the sections themselves; the helpers both use: gpu_helpers
from benchmarks.gpu_sections import call_picker as call_picker  # re-exported: the tests import it from here
from benchmarks.gpu_v15 import V15_MODEL, check_v15

ROOT = Path(__file__).resolve().parents[1]
# Compile runs last: its cost is the least predictable, and on a CPU its main finding shows too.
# CogVideoX 1.5 after it: the released weights, minutes of loading, and skipped where they are not downloaded.
SECTIONS = ("decode_oom", "offload", "attention", "pinned", "quantize", "compile", "v15")
CHECKS = {**CHECKS, "v15": check_v15}
# Seconds a section may run at most (a hung kernel or a slow compile must not eat the whole budget).
SECTION_CAPS = {
    "decode_oom": 150,
    "offload": 120,
    "attention": 60,
    "compile": 170,
    "pinned": 200,
    "quantize": 150,
    "v15": 540,
}
OVERRUN_S = 30  # how far past --budget-s the section running then may go
NEXT_STEP = "-m benchmarks.bench_pipeline --device cuda --modes resident --ckpt /tmp/cogvideox-2b-random"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the CPU smoke test); always on a CPU")
    p.add_argument("--out", help="JSON results here (written after every section)")
    p.add_argument("--md", help="markdown summary here (default: --out with .md)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining sections after this")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--headroom-gib", type=float, default=4.0, help="decode_oom: memory allowed above weights")
    p.add_argument("--layers", type=int, default=6, help="offload: transformer layers")
    p.add_argument("--steps", type=int, default=5, help="offload: timed steps per mode (after a warm-up)")
    p.add_argument("--compile-layers", type=int, default=2)
    p.add_argument("--compile-shapes", type=int, default=None, help="compile: only the first N shapes")
    p.add_argument("--compile-budget-s", type=float, default=120.0, help="compile: no new shape after this")
    p.add_argument(
        "--compile-backend",
        help="torch.compile backend inside compile_blocks (default inductor; tiny: eager, i.e. dynamo's graphs, "
        "guards and recompiles without inductor's code generation, ~25 s a graph on a 2-core CPU)",
    )
    p.add_argument("--ckpt", help="pinned: random 2B checkpoint folder (written if missing, kept)")
    p.add_argument(
        "--v15-model", default=V15_MODEL, help="v15: a Hub id (from the local cache only) or folder"
    )
    p.add_argument("--v15-frames", type=int, default=81, help="v15: frames at 1360x768 (81: 5 s, 161: 10 s)")
    p.add_argument("--v15-steps", type=int, default=2, help="v15: denoising steps per clip")
    p.add_argument("--v15-modes", default="model,sequential", help="v15: comma list of memory modes")
    p.add_argument("--commit", help="the git commit to record where git cannot say (a copy without .git)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    args.tiny = args.tiny or args.device.type != "cuda"
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    args.sections = [s for s in args.sections.split(",") if s]
    if not set(args.sections) <= set(SECTIONS):
        p.error(f"sections must be among {SECTIONS}")
    if args.md is None and args.out:
        args.md = str(Path(args.out).with_suffix(".md"))
    return args


def git_commit(fallback: str | None = None) -> dict:
    def git(*cmd):
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit = status = None
    if commit is None:
        return {"commit": fallback, "dirty": None, "from": "--commit" if fallback else "unknown: no git here"}
    return {"commit": commit, "dirty": None if status is None else bool(status), "from": "git"}


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda}
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, total_gib=props.total_memory / GiB, capability=f"{props.major}.{props.minor}"
        )
        info.update(multiprocessors=props.multi_processor_count, cudnn=torch.backends.cudnn.version())
    return info


# -- the run: clock, budget, one section at a time, outputs -------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, args.device
        self.dtype = torch.float16 if is_cuda(self.device) else torch.float32
        self.t0 = time.perf_counter()
        self._tmp: Path | None = None
        self._scaffold: Path | None = None
        python = ".venv/bin/python" if sys.executable.startswith(str(ROOT / ".venv")) else "python3"
        self.data = {
            "tool": "benchmarks.gpu_check",
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine(),
            "device": device_info(self.device),
            "git": git_commit(args.commit),
            "source_digest": source_digest(),
            "args": {k: str(v) if isinstance(v, torch.device) else v for k, v in vars(args).items()},
            "budget_s": args.budget_s,
            "sections": {},
            "next_step": f"{python} {NEXT_STEP} --out cuda-resident.json",
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, message: str) -> None:
        print(f"[{datetime.datetime.now():%H:%M:%S} +{self.elapsed():6.1f}s] {message}", flush=True)

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="cogvideox-gpu-check-"))
        return self._tmp

    def cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def scaffold(self) -> Path:
        """Configs, tokenizer and scheduler in the released layout, for a pipeline whose modules are set by hand."""
        if self._scaffold is None:
            from cogvideox.testing import write_tiny_checkpoint

            self._scaffold = write_tiny_checkpoint(self.tmp / "scaffold")
        return self._scaffold

    def section(self, name: str, fn) -> None:
        remaining = self.args.budget_s - self.elapsed()
        if remaining <= 0:
            reason = f"global budget of {self.args.budget_s:.0f} s spent before this section"
            self.data["sections"][name] = {"status": "skipped", "reason": reason}
            self.log(f"{name}: skipped ({reason})")
            self.write()
            return
        limit = max(1, int(min(SECTION_CAPS[name], remaining + OVERRUN_S)))
        self.log(f"{name}: start (at most {limit} s)")
        t = time.perf_counter()
        alarm = hasattr(signal, "setitimer")
        if alarm:  # the timer is shared (pytest-timeout uses it too): re-armed with what was left of it
            old = signal.signal(signal.SIGALRM, _raise_timeout)
            previous = signal.setitimer(signal.ITIMER_REAL, limit)[0]
        try:
            result = {"status": "ok", **fn(self)}
        except Exception as e:  # recorded, and the next section runs (Ctrl-C still stops everything)
            result = {"status": "error", **error_record(e)}
            self.log(f"{name}: ERROR {short_error(e)}")
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
                if previous:
                    signal.setitimer(signal.ITIMER_REAL, max(previous - (time.perf_counter() - t), 1e-3))
            free_memory(self.device)
        result["seconds"] = time.perf_counter() - t
        self.data["sections"][name] = jsonable(result)
        self.log(f"{name}: {result['status']} in {result['seconds']:.1f} s; verdict {result.get('verdict')}")
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        for path, text in (
            (self.args.out, lambda: json.dumps(self.data, indent=2, default=str)),
            (self.args.md, self.md),
        ):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_text(text())

    def md(self) -> str:
        return markdown(self.data)


def _raise_timeout(signum, frame):
    raise SectionTimeout("section time limit reached")


# -- the report -----------------------------------------------------------------------------------------------


def _cell(value, width: int = 160) -> str:
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")[:width]


def markdown(data: dict) -> str:
    dev, git, s = data["device"], data["git"], data["sections"]
    lines = [
        f"# GPU check (issue 10): {dev.get('name', dev['type'])}, {data['date']}",
        "",
        f"- machine: {data['machine']}; CUDA {dev['cuda']}, cuDNN {dev.get('cudnn')}",
        f"- git commit {git['commit']} (uncommitted changes: {git['dirty']}); cogvideox/*.py sha256 "
        f"{data['source_digest']}",
        f"- elapsed {data.get('elapsed_s', 0):.0f} s of a {data['budget_s']:.0f} s budget",
        "",
    ]
    rows = []
    for name in SECTIONS:
        r = s.get(name, {"status": "not run"})
        detail = (
            r.get("summary") or r.get("reason") or (f"{r['error']}: {r['message']}" if "error" in r else "")
        )
        rows.append([name, r["status"], r.get("verdict"), r.get("seconds"), _cell(detail, 400)])
    lines += [markdown_table(["section", "status", "verdict", "seconds", "result"], rows), ""]

    lines += detail_tables(s)
    lines += [f"Next step (not run here): `{data['next_step']}`", ""]
    return "\n".join(lines)


def _attempts(r: dict) -> list[list]:
    return [[_cell(a["kwargs"]), _cell(a["error"]), a["seconds"], a["peak_gib"]] for a in r["attempts"]]


def _modes(r: dict) -> list[list]:
    return [
        [m, r[m]["s_per_step"], r[m].get("peak_gib"), r[m].get("base_gib")]
        for m in ("resident", "sequential")
    ]


def _kernels(r: dict) -> list[list]:
    cells = ("backend", "ms", "tflops", "max_abs_diff_vs_efficient")
    return [[*(k.get(c) for c in cells), _cell(k.get("error"))] for k in r["kernels"]]


def _shapes(r: dict) -> list[list]:
    cells = ("frames", "first_s", "later_s", "unique_graphs")
    return [
        [_cell(x["shape"]), *(x.get(c) for c in cells), _cell(x.get("error") or x.get("skipped"))]
        for x in r["shapes"]
    ]


def _v15(r: dict) -> list[list]:
    rows = []
    for mode, m in r["modes"].items():
        t = m["timings"]
        cells = [
            t["load"],
            t["text"],
            m["s_per_step"],
            t["decode"],
            m["peak_gib"],
            m["extrapolated_50_steps_s"],
        ]
        rows.append([mode, *cells, _cell(m["frames_shape"])])
    return rows


def _weights(r: dict) -> list[list]:
    return [[n, w["state_dict"], w["params_and_buffers"]] for n, w in r["weights"].items()]


def _pinned_note(r: dict) -> str:
    return (
        f"pinned_bytes {r['pinned_bytes']}; home_bytes {r['home_bytes']}; process: {r['host_memory_delta']}"
    )


# Each section's own table: (section, the key its record needs for it, title, headers, rows, note).
DETAIL_TABLES = [
    (
        "decode_oom",
        "attempts",
        "the retry ladder",
        ["attempt kwargs", "error", "seconds", "peak GiB"],
        _attempts,
        None,
    ),
    (
        "offload",
        "resident",
        "resident vs sequential",
        ["mode", "s/step (median)", "peak GiB", "allocated before GiB"],
        _modes,
        lambda r: r["summary"],
    ),
    (
        "attention",
        "kernels",
        "fused SDPA kernels",
        ["backend", "ms", "TFLOP/s", "max abs diff vs efficient", "error"],
        _kernels,
        lambda r: r["summary"],
    ),
    (
        "compile",
        "shapes",
        "one row per call pair",
        ["shape (b, f, h, w)", "frames", "first s", "later s", "unique graphs", "error / note"],
        _shapes,
        None,
    ),
    (
        "pinned",
        "weights",
        "page-locked vs weight bytes",
        ["component", "state-dict bytes", "params + buffers bytes"],
        _weights,
        _pinned_note,
    ),
    (
        "v15",
        "modes",
        "CogVideoX1.5-5B per memory mode (measured; the 50-step time extrapolated from the steps run)",
        ["mode", "load s", "text s", "s/step", "decode s", "peak GiB", "50 steps s (extrapolated)", "frames"],
        _v15,
        lambda r: f"{r['frames']} frames {r['width']}x{r['height']}, {r['steps']} steps, {r['model']}",
    ),
]


def detail_tables(s: dict) -> list[str]:
    """Each section's own table (markdown lines), for the sections that got far enough to fill one."""
    lines = []
    for name, key, title, headers, rows, note in DETAIL_TABLES:
        if key in s.get(name, {}):
            lines += [f"## {name}: {title}", "", markdown_table(headers, rows(s[name]))]
            text = note(s[name]) if note else None
            lines += ["", text, ""] if text else [""]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args)
    dev = run.data["device"]
    run.log(
        f"gpu_check on {dev.get('name', dev['type'])}: torch {dev['torch']}, CUDA {dev['cuda']}, git "
        f"{run.data['git']['commit']}, cogvideox sha256 {run.data['source_digest']}; tiny={args.tiny}, "
        f"budget {args.budget_s:.0f} s"
    )
    try:
        for name in args.sections:
            run.section(name, CHECKS[name])
    finally:
        run.write()
        run.cleanup()
    print("\n" + markdown(run.data), flush=True)
    statuses = [r["status"] for r in run.data["sections"].values()]
    counts = ", ".join(f"{statuses.count(k)} {k}" for k in ("ok", "skipped", "error"))
    run.log(f"done: {counts}. Next step, the full-size benchmark against diffusers: {run.data['next_step']}")
    return 1 if "error" in statuses else 0


if __name__ == "__main__":
    sys.exit(main())
