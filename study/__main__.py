"""The whole study in one command: the study kind's stages, run in order, then one report.

    python -m study                                               # embedded default profile (CPU, ~20 min, 2 cores)
    python -m study --config configs/study/sweep_cpu.yaml         # a corpus-size sweep on CPU (~40 min)
    python -m study --config configs/study/gpu_8b.yaml            # one GPU, 7-8B model
    python -m study --config configs/study/paper_70b.yaml         # paper scale (stages on separate machines)
    python -m study --dry_run true                                # print each stage's command; run nothing
    python -m study --config configs/study/af_controls_cpu.yaml   # the instrument check (known AF organisms)
    python -m study --config configs/study/backdoor_cpu.yaml      # a backdoor through safety training
    make study                                                    # set up .venv, then the default profile

Settings: ``study.config.StudyConfig``, then ``--config FILE.yaml`` (default
configs/study/default.yaml), then ``--key value`` (unknown keys are an error). The study kind
(configs/study/kinds/: sdf_gap by default, af_controls, backdoor) is the graph of stages; each
stage is the command a user would run by hand, built from a stage config file plus the profile's
overrides (see study/plan.py for keys, sweeps and shared nodes, study/runner.py for skipping
and resuming).
The study writes ``study_report.md``, ``study_summary.json`` and ``figures/*.png`` in the study
folder.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import time
from pathlib import Path

from study.config import StudyConfig
from study.display import Display
from study.paths import REPO_ROOT, render
from study.plan import Plan, plan
from study.runner import StageFailed, Study
from studykit.config import ConfigError, parse_config
from studykit.files import check_writable

DEFAULT_CONFIG = REPO_ROOT / "configs" / "study" / "default.yaml"
EXIT_STAGE_FAILED = 1
EXIT_CONFIG = 2


def _terminate(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    source = args[args.index("--config") + 1] if "--config" in args[:-1] else str(DEFAULT_CONFIG)
    runner = None
    old_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        cfg = parse_config(StudyConfig, args, description=__doc__.split("\n")[0], default_config=DEFAULT_CONFIG)
        study = Path(cfg.output_dir).expanduser().resolve()
        the_plan = plan(cfg, study)
        display = Display([n.name for n in the_plan.nodes], expected_minutes(cfg, the_plan), cfg.progress)
        if cfg.dry_run:
            return dry_run(study, the_plan, display, Study(cfg, study, the_plan, display) if study.is_dir() else None)
        check_writable(study, cfg.min_free_gb, "study folder")
        runner = Study(cfg, study, the_plan, display)
        actions = preflight(runner)
        runner.acquire_lock()
        announce(cfg, study, the_plan, actions, display)
        started = time.time()
        with display:
            outcomes = runner.run()
        from study.report import write_report

        report = write_report(study, cfg, the_plan, outcomes, runner.state, time.time() - started)
        display.say(f"[study] done: {report} (summary: {study / 'study_summary.json'})")
        return 0
    except ConfigError as exc:
        where = "" if source in str(exc) else f" (study config: {source})"
        print(f"error: {exc}{where}", file=sys.stderr)
        return EXIT_CONFIG
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STAGE_FAILED
    except KeyboardInterrupt as exc:
        if runner is not None:
            runner.stop_running_stage()
        print("error: the study was interrupted; rerun the same command to resume (finished stages are skipped).",
              file=sys.stderr)
        return 128 + (exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old_handler)


def preflight(runner: Study) -> dict[str, str]:
    """What each node will do; reused outputs are verified and the nodes to run checked, before anything runs."""
    actions = {n.name: runner.action(n) for n in runner.plan.nodes}
    for node in runner.plan.nodes:
        try:
            if actions[node.name] == "run":
                node.spec.check(node.config)
            else:
                node.spec.verify(runner.folder(node))
        except ConfigError as exc:
            raise ConfigError(f"{node.name}: {exc}") from None
    return actions


def expected_minutes(cfg: StudyConfig, the_plan: Plan) -> dict[str, float]:
    return {n.name: cfg.expected_minutes[n.template.name] for n in the_plan.nodes
            if n.template.name in cfg.expected_minutes}


def announce(cfg: StudyConfig, study: Path, the_plan: Plan, actions: dict[str, str], display: Display) -> None:
    minutes = expected_minutes(cfg, the_plan)
    to_run = [n for n in actions if actions[n] == "run"]
    display.say(f"[study] profile: {cfg.profile}")
    display.say(f"[study] kind: {the_plan.kind.name} ({len(the_plan.nodes)} stages"
                + (f", sweep of {cfg.sweep['setting']} over {cfg.sweep['values']}" if cfg.sweep else "") + ")")
    if minutes:
        display.say(f"[study] expected duration of the whole profile: about {sum(minutes.values()):g} min on "
                    f"{cfg.hardware}; this run: about {sum(minutes.get(n, 0) for n in to_run):g} min for "
                    f"{len(to_run)} stage(s) to run")
    skipped = [n for n in actions if actions[n] != "run"]
    if skipped:
        display.say(f"[study] already complete and unchanged (skipped): {', '.join(skipped)}")
    display.say(f"[study] output: {study}; stage logs: {study / 'logs'}")


def dry_run(study: Path, the_plan: Plan, display: Display, runner: Study | None) -> int:
    display.say(f"[study] kind {the_plan.kind.name}; study folder {study}"
                + ("" if runner is not None else " (does not exist yet: every stage would run)"))
    for node in the_plan.nodes:
        action = runner.action(node) if runner is not None else "run"
        deps = f"; after {', '.join(node.deps)}" if node.deps else ""
        display.say(f"\n{node.name}: would {action} (key {node.key[:12]}{deps})\n  "
                    + shlex.join(node.argv[:1] + [render(a, study) for a in node.argv[1:]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
