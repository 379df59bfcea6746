"""``labkit doctor | fetch | run EXPERIMENT | report | serve | bench-serve``.

User errors (:class:`labkit.LabkitError`) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from labkit import LabkitError


def _cmd_doctor(args: argparse.Namespace) -> None:
    from labkit import env

    info = env.describe()
    if args.ceilings:
        from labkit import roofline

        info["ceilings"] = roofline.ceilings(str(env.resolve_device(args.device))).as_dict()
    print(json.dumps(info, indent=2) if args.json else env.format_table(info))


def _cmd_fetch(args: argparse.Namespace) -> None:
    from labkit import zoo

    for name, secs in zoo.fetch(args.names or None).items():
        print(f"{name}: ready ({secs:.1f} s)")


def _cmd_run(args: argparse.Namespace) -> None:
    from labkit import env, experiments
    from labkit.results import ensure_writable

    mod = experiments.get(args.experiment)
    out = ensure_writable(args.out)  # fail before any work, not after
    config = mod.Config.quick() if args.quick else mod.Config()
    if args.device is not None:
        config.device = str(env.resolve_device(args.device))
    t0 = time.perf_counter()
    rec = mod.run(config)
    rec.config["quick"] = bool(args.quick)
    rec.config["wall_s"] = round(time.perf_counter() - t0, 1)
    path = rec.save(out)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:,.4g}".format):
        frame = rec.to_frame()  # the per-run lists stay in the record, not on the screen
        frame = frame.drop(columns=[c for c in frame.columns if c == "provenance" or c.endswith("_runs")])
        print(frame.to_string(index=False))
    print(f"\nwrote {path} ({rec.config['wall_s']} s)")


def _cmd_course(args: argparse.Namespace) -> None:
    from labkit import course

    course.run(args)


def _cmd_site(args: argparse.Namespace) -> None:
    from labkit import site

    site.run(args)


def _cmd_report(args: argparse.Namespace) -> None:
    from labkit import report

    print(f"wrote {report.build(args.results, args.out)}")


def _cmd_serve(args: argparse.Namespace) -> None:
    from labkit.serve.config import EngineConfig
    from labkit.serve.server import serve

    engine = {f: getattr(args, f) for f in EngineConfig.__dataclass_fields__}
    serve(model=args.model, host=args.host, port=args.port, api_key=args.api_key or None,
          allow_unauthenticated=args.allow_unauthenticated, max_body_bytes=args.max_body_bytes,
          max_in_flight=args.max_in_flight, dtype=args.dtype, **engine)


def _cmd_bench_serve(args: argparse.Namespace) -> None:
    from labkit.serve.client import main_from_args

    main_from_args(args)


def _cmd_grade(args: argparse.Namespace) -> None:
    from labkit import grading

    rows = grading.grade(args.submissions, args.out, lesson=args.lesson, cell_timeout=args.cell_timeout,
                         notebook_timeout=args.notebook_timeout, memory_mb=args.memory_mb,
                         gradescope=args.gradescope, jobs=args.jobs)
    for r in rows:
        print(f"{r.learner}: {r.total:g} / {sum(e['max_points'] for e in r.exercises.values()):g}  ({r.status})")
    print(f"wrote {Path(args.out) / 'grades.csv'}, grades.json, feedback/"
          + (", gradescope/" if args.gradescope else ""))


def _cmd_export_gradescope(args: argparse.Namespace) -> None:
    from labkit.grading import gradescope

    out = gradescope.build(args.lesson, args.out, args.wheel)
    print(f"wrote {out}: upload it as the assignment's autograder (Gradescope: Configure Autograder → zip file); "
          "learners submit the lesson's notebook")


def _cmd_export_otter(args: argparse.Namespace) -> None:
    from labkit.grading import otter

    files = otter.export(args.dir, lesson=args.lesson, seed=args.seed, points=args.points)
    print(f"wrote {len(files)} Otter test files to {Path(args.dir) / 'tests'}: "
          + ", ".join(f.stem for f in files))
    print("next: `otter generate -t DIR/tests` for Gradescope, or `grader.check(NAME)` / `otter run` with these tests")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labkit", description="Inference optimization, measured honestly.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("doctor", help="what hardware and libraries are here")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--ceilings", action="store_true",
                   help="also measure memory bandwidth and GEMM FLOP/s (a few seconds)")
    d.add_argument("--device", default=None, help="device for --ceilings (default: the kit's default device)")
    d.set_defaults(fn=_cmd_doctor)

    f = sub.add_parser("fetch", help="pre-fetch the offline models")
    f.add_argument("names", nargs="*", help="model names (default: all)")
    f.set_defaults(fn=_cmd_fetch)

    r = sub.add_parser("run", help="run an experiment and write DIR/EXPERIMENT.json")
    r.add_argument("experiment")
    r.add_argument("--quick", action="store_true", help="small sizes (minutes on 2 CPU cores)")
    r.add_argument("--out", default="results", help="output directory (default: results)")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU where there is one)")
    r.set_defaults(fn=_cmd_run)

    rep = sub.add_parser("report", help="render results/*.json into reports/index.html")
    rep.add_argument("--results", default="results")
    rep.add_argument("--out", default="reports/index.html")
    rep.set_defaults(fn=_cmd_report)

    s = sub.add_parser("serve", help="OpenAI-compatible server over labkit's paged engine")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("LABKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (vLLM's flag; default $LABKIT_API_KEY)")
    s.add_argument("--allow-unauthenticated", action="store_true",
                   help="listen on a non-loopback --host without --api-key (refused otherwise)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    s.add_argument("--max-in-flight", type=int, default=None,
                   help="requests admitted at once (running + waiting); one more is answered 503 (default: no bound)")
    from labkit import env

    s.add_argument("--dtype", default="auto", choices=list(env.DTYPE_NAMES),
                   help="weights, activations and KV cache (vLLM's flag): auto = bf16 where this device runs it "
                        "natively, else float32")
    from labkit.serve.config import cli_options

    for flag, kind, default, doc in cli_options():  # every engine setting, from EngineConfig's fields
        if kind is None:
            s.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=doc)
        else:
            s.add_argument(flag, type=kind, default=default, help=doc)
    s.set_defaults(fn=_cmd_serve)

    b = sub.add_parser("bench-serve", help="load generator against any OpenAI-compatible server")
    b.add_argument("--url", default="http://127.0.0.1:8000")
    b.add_argument("--model", default=None)
    b.add_argument("--num-requests", type=int, default=32)
    b.add_argument("--request-rate", type=float, default=float("inf"))
    b.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    b.add_argument("--output-len", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--slo-ttft-ms", type=float, default=None)
    b.add_argument("--slo-tpot-ms", type=float, default=None)
    b.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default: none)")
    b.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    b.set_defaults(fn=_cmd_bench_serve)

    g = sub.add_parser("grade", help="run a cohort's notebooks and grade every exercise they check")
    g.add_argument("submissions", nargs="+", help="submitted .ipynb files or directories of them (learner = file name)")
    g.add_argument("--out", default="grades", help="output directory (default: grades)")
    g.add_argument("--lesson", default=None, help="the lesson graded, e.g. 01 (default: the lessons learners checked)")
    g.add_argument("--cell-timeout", type=float, default=120.0, help="seconds a cell may run (default: 120)")
    g.add_argument("--notebook-timeout", type=float, default=900.0, help="seconds a notebook may run (default: 900)")
    g.add_argument(
        "--memory-mb",
        type=int,
        default=8192,
        help="address-space limit of each run in MiB (default: 8192; the SmolLM2 lessons need more than 4096)",
    )
    g.add_argument("--gradescope", action="store_true", help="also write gradescope/<learner>/results.json")
    g.add_argument("--jobs", type=int, default=None,
                   help="notebooks graded at once (default: this machine's cores; each may use --memory-mb)")
    g.set_defaults(fn=_cmd_grade)

    from labkit import course

    c = sub.add_parser(
        "course", help="write the course bundle an instructor hands out (wheel, notebooks, START_HERE.md)"
    )
    course.add_arguments(c)
    c.set_defaults(fn=_cmd_course)

    from labkit import site

    st = sub.add_parser("site", help="build the course website: lessons executed, measured results, guides, API")
    site.add_arguments(st)
    st.set_defaults(fn=_cmd_site)

    gs = sub.add_parser("export-gradescope", help="write a Gradescope autograder zip for one lesson's exercises")
    gs.add_argument("--lesson", required=True, help="the lesson graded, e.g. 01")
    gs.add_argument("--out", default="autograder.zip", help="the zip to write (default: autograder.zip)")
    gs.add_argument("--wheel", default=None, help="the kit's wheel to ship (default: the newest in dist/; make dist)")
    gs.set_defaults(fn=_cmd_export_gradescope)

    o = sub.add_parser("export-otter", help="write Otter-Grader test files (DIR/tests) for the kit's exercises")
    o.add_argument("dir", help="output directory; the tests go to DIR/tests")
    o.add_argument("--lesson", default=None, help="only this lesson's exercises, e.g. 01 (default: all)")
    o.add_argument("--seed", type=int, default=1, help="seed of the hidden cases' inputs, >= 1 (default: 1)")
    o.add_argument("--points", type=float, default=1.0, help="points per exercise, half per case (default: 1)")
    o.set_defaults(fn=_cmd_export_otter)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LabkitError as exc:
        print(f"labkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
