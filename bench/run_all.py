"""Run every benchmark in bench/, one after another, and summarise them.

Run: ``python bench/run_all.py`` (full mode, what ``make bench`` does), ``--quick`` to pass
``--quick`` to the benchmarks that take it (the others run as they are; the real-cell variants
``train_real`` and ``annotate_speed_real`` are skipped), ``--only a,b`` to run a subset. Each benchmark's output is shown as it runs; its final JSON line is printed again after it
ends, then a summary table and ONE JSON line (name -> exit code, seconds, final JSON). The exit code
is 1 when any benchmark failed: a non-zero exit, or no JSON object on its last output line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# Order: cheap to expensive is not the point; data first, then the model, then the annotator.
ORDER = ("ingest", "scale", "loader", "x_encoding", "train", "train_real", "tokenize_speed", "attention_speed", "annotate_speed",
         "annotate_speed_real", "annotate_quality")
# Variants: the same script with other arguments (real cells of ../shared/data instead of synthetic ones).
VARIANTS = {
    "train_real": ("train", ["--real", "--sizes", "debug,debug:data.max_genes=1200", "--reps", "3", "--debug-steps", "10"]),
    "annotate_speed_real": ("annotate_speed", ["--real", "--speed-cells", "2000", "--reps", "3"]),
}


def script_of(name: str) -> tuple[Path, list[str]]:
    base, extra = VARIANTS.get(name, (name, []))
    return BENCH / f"{base}.py", list(extra)


def available() -> list[str]:
    return [name for name in ORDER if script_of(name)[0].is_file()]


def takes_quick(script: Path) -> bool:
    return '"--quick"' in script.read_text() or "'--quick'" in script.read_text()


def last_json(lines: list[str]) -> dict | None:
    """The benchmark's final JSON object: its last non-empty stdout line, parsed."""
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None
    return None


def run_one(name: str, quick: bool) -> dict:
    script, extra = script_of(name)
    cmd = [sys.executable, str(script), *extra]
    if quick and not extra and takes_quick(script):
        cmd.append("--quick")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    lines: list[str] = []
    # stdout is echoed line by line (long benchmarks show progress) and kept for the JSON line;
    # stderr goes straight through.
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    result = last_json(lines)
    ok = rc == 0 and result is not None
    why = "" if ok else (f"exit code {rc}" if rc != 0 else "no JSON object on its last output line")
    print(f"=== {name}: {'ok' if ok else 'FAILED (' + why + ')'} in {seconds:.1f} s", flush=True)
    if result is not None:
        print(json.dumps(result), flush=True)
    return {"name": name, "ok": ok, "rc": rc, "seconds": round(seconds, 1), "quick": "--quick" in cmd, "error": why, "result": result}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to the benchmarks that take it")
    ap.add_argument("--only", action="append", default=[], metavar="NAME[,NAME]",
                    help=f"run only these (repeatable or comma-separated; of: {', '.join(ORDER)})")
    ap.add_argument("--list", action="store_true", help="print the benchmarks found and exit")
    args = ap.parse_args(argv)

    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = [n.strip().removesuffix(".py") for group in args.only for n in group.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"run_all: error: no benchmark {', '.join(unknown)} in {BENCH} (found: {', '.join(names)})", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    elif args.quick:
        names = [n for n in names if n not in VARIANTS]  # the real-cell variants have no quick mode
    missing = [n for n in ORDER if n not in available()]
    print(f"benchmarks ({'quick' if args.quick else 'full'} mode): {', '.join(names)}"
          + (f"; not present: {', '.join(missing)}" if missing else ""), flush=True)

    runs = []
    for name in names:
        try:
            runs.append(run_one(name, args.quick))
        except KeyboardInterrupt:
            print(f"=== {name}: interrupted", file=sys.stderr)
            return 130

    print("\nsummary")
    print(f"{'benchmark':18} {'status':8} {'mode':6} {'seconds':>9}")
    for r in runs:
        print(f"{r['name']:18} {'ok' if r['ok'] else 'FAILED':8} {'quick' if r['quick'] else 'full':6} {r['seconds']:9.1f}"
              + (f"  ({r['error']})" if r["error"] else ""))
    failed = [r["name"] for r in runs if not r["ok"]]
    print(f"{len(runs) - len(failed)} of {len(runs)} benchmarks ok" + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(json.dumps({"ok": not failed, "failed": failed,
                      "benchmarks": {r["name"]: {k: r[k] for k in ("rc", "seconds", "quick", "result")} for r in runs}}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
