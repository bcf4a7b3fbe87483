"""What `make demo` and `make demo-full` run (the runs themselves are measured by hand: minutes each)."""

from __future__ import annotations

from demo.run import BACKBONES, distill_runs, mode_name, parse_args


def test_demo_runs_the_headline_and_demo_full_adds_both_backbones_at_once():
    demo, full = parse_args([]), parse_args(["--full"])
    assert (mode_name(demo), mode_name(full)) == ("demo", "demo-full")
    assert [(name, method, backbones) for name, method, backbones in distill_runs(demo)] == [
        ("LGM", "lgm", ("efficientnet-lite0",)), ("CLP", "clp", ("efficientnet-lite0",))]
    assert distill_runs(full)[:2] == distill_runs(demo)
    assert [backbones for _, _, backbones in distill_runs(full)[2:]] == [BACKBONES]


def test_demo_val_split_is_smaller_than_train_and_probe_options_default_to_engine_eval():
    args = parse_args([])
    assert args.val_limit_per_class < args.limit_per_class
    assert (args.seeds, args.epochs) == (None, None)


def test_demo_distills_fewer_steps_than_demo_full_unless_told():
    from demo.run import DEMO_STEPS, FULL_STEPS

    assert (parse_args([]).steps, parse_args(["--full"]).steps) == (DEMO_STEPS, FULL_STEPS)
    assert DEMO_STEPS < FULL_STEPS
    assert parse_args(["--full", "--steps", "8"]).steps == 8

