"""The library's structure and its single owners: the probe protocol (a new probe is one class and one registry line),
one sampling loop that starts anywhere, one guided-or-conditional rule, one log-SNR axis, one radius check, the
summary's reader, the CLI's error policy, and a dependency graph without upward imports."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyClassifier, gen, small_config

from critsample import detect, plans, summary
from critsample.attention import check_radius
from critsample.cli import main
from critsample.denoisers import is_guided
from critsample.detect import estimators
from critsample.detect.protocol import Probe, ProbeOutput
from critsample.errors import UserError
from critsample.noise import Schedule
from critsample.probes.forward_backward import denoise_from, start_index
from critsample.sampling import Plan, Step, sample

ROOT = Path(__file__).resolve().parents[1]


# -- the probe protocol ------------------------------------------------------------------------


TOY_TIMES = np.linspace(0.1, 0.9, 9)


class MeanPixel(Probe):
    """A toy probe: a bump over t with per-sample noise, per unit one batch of samples; window = its FWHM."""

    name = "mean_pixel"
    family = "symmetry_breaking"
    kinds = ("mean_pixel",)
    computed: list = []

    def data_samples(self, det):
        return 4

    def key_config(self, det):
        return {"mean_pixel": {"times": TOY_TIMES.tolist()}}

    def units(self, det):
        return [det.store.unit("mean_pixel", {"lo": lo, "hi": lo + 2}, forwards=0) for lo in (0, 2)]

    def compute(self, det, unit, g):
        self.computed.append(unit.key)
        n = unit.params["hi"] - unit.params["lo"]
        bump = np.exp(-((TOY_TIMES - 0.5) ** 2) / (2 * 0.12**2))
        return {"curve": bump[None] * (1 + 0.05 * torch.randn(n, 1, generator=g, dtype=torch.float64).numpy()),
                "t": TOY_TIMES}

    def summarize(self, det, results, out):
        us = results.units("mean_pixel")
        curve, t = results.cat(us, "curve"), results[us[0]]["t"]
        w = estimators.half_max_window(self.name, self.family, t, curve, det.model.schedule)
        return ProbeOutput(windows={self.name: w}, record={"window": w.to_dict(), "curve": curve.mean(0).tolist()})


def test_a_new_probe_is_one_class_and_one_registry_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(detect.PROBES, "mean_pixel", MeanPixel())
    cfg = small_config(tmp_path, probes=["cond_gap", "mean_pixel"])
    s = detect.run(cfg, tiny, classifier=TinyClassifier())
    assert set(s["probes"]) == {"cond_gap", "mean_pixel"}
    assert s["windows"]["mean_pixel"]["probe"] == "mean_pixel" and "mean_pixel" in s["critical_window"]["members"]
    assert len(MeanPixel.computed) == 2 and len(list((tmp_path / "units" / "mean_pixel").glob("*.npz"))) == 2
    # resumed: its units are loaded, not recomputed, and the record is the same
    again = detect.run(cfg, tiny, classifier=TinyClassifier())
    assert len(MeanPixel.computed) == 2 and again["probes"]["mean_pixel"] == s["probes"]["mean_pixel"]
    # its name is validated through the same registry
    monkeypatch.delitem(detect.PROBES, "mean_pixel")
    with pytest.raises(UserError, match="Unknown probe 'mean_pixel'"):
        detect.run(cfg, tiny, classifier=TinyClassifier())


def test_probes_sharing_a_unit_kind_compute_it_once(tiny, tmp_path):
    """cond_gap and locality_gap read the same trajectories: the units are deduplicated by key."""
    both, units = detect.prepare(small_config(tmp_path, probes=["cond_gap", "locality_gap"]), tiny)
    one, units_one = detect.prepare(small_config(tmp_path, probes=["locality_gap"]), tiny)
    assert [u.key for u in units] == [u.key for u in units_one] and len({u.key for u in units}) == len(units)


# -- one sampling loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ddim", "flow"])
def test_the_loop_started_mid_way_continues_the_full_run_exactly(tiny, sd3, family):
    model, cond = (tiny, torch.tensor([1, 7])) if family == "ddim" else (sd3, sd3.encode_prompt(["a", "b"]))
    plan = Plan.from_rule(model, 6, lambda t: Step.conditional(2.0) if t > 0.5 else Step("uncond"), name="switch")
    states = []
    full = sample(model, plan, cond, generator=gen(3), callback=lambda d: states.append(d["x_in"]))
    for start in (1, 4):
        assert torch.equal(sample(model, plan, cond, x=states[start], start=start), full)


def test_forward_backward_runs_on_a_flow_model_through_the_loop(sd3):
    """diffusers' FlowMatchEuler has no scale_model_input: the second loop the probe used to have broke there."""
    x0 = torch.randn(2, *sd3.sample_shape, generator=gen(1))
    null = sd3.null(sd3.encode_prompt(["a", "b"]))
    x_hat, t_used = denoise_from(sd3, x0, 0.5, null, [None, 1], steps=6, generator=gen(2))
    assert x_hat.shape == (2, *x0.shape) and torch.isfinite(x_hat).all()
    i0, t_grid = start_index(sd3, 0.5, 6)
    assert t_used == t_grid
    # the global row is the one loop started at i0 from the same noised state
    eps = torch.randn(x0.shape, generator=gen(2))
    xt = sd3.schedule.add_noise(x0, torch.tensor(t_used), eps)
    ref = sample(sd3, Plan.from_rule(sd3, 6, lambda t: Step("cond")), null, x=xt, start=i0)
    assert torch.allclose(x_hat[0], ref, atol=1e-5)


# -- w = 1 is one forward, everywhere ----------------------------------------------------------


def test_guidance_one_is_one_conditional_forward(tiny):
    assert not is_guided(1.0) and not is_guided(None) and is_guided(1.5)
    assert Step("guided", None, 1.0).mode == "cond" and Step.conditional(1.0) == Step("cond")
    plan = plans.full_guidance(tiny, 5, 1.0)
    assert plan.forwards == 5 and all(s.mode == "cond" for s in plan.steps)
    assert plans.full_guidance(tiny, 5, 2.0).forwards == 10
    rows = []
    orig = tiny.transformer.forward

    def counting(hidden_states, *a, **kw):
        rows.append(hidden_states.shape[0])
        return orig(hidden_states, *a, **kw)

    tiny.transformer.forward = counting
    try:
        x, t, c = torch.randn(3, 1, 8, 8, generator=gen(0)), 0.4, torch.tensor([1, 2, 3])
        assert torch.equal(tiny.predict(x, t, c, guidance=1.0), tiny.predict(x, t, c))
        sample(tiny, plan, c, generator=gen(0))
    finally:
        del tiny.transformer.forward
    assert rows == [3, 3] + [3] * 5  # two plain predicts, then one forward of 3 rows per step


# -- one log-SNR axis --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_log_snr_axis_is_continuous_monotone_and_matches_the_network_at_its_steps(kind):
    sch = Schedule(kind=kind)
    k = torch.arange(0, 1000, 37)
    t = k.double() / 1000
    a, s = sch.alpha_sigma(t)
    model_side = 2 * (a.log() - s.log())
    lam = sch.log_snr(t)
    if kind == "flow":
        t = t[1:]  # t = 0 is clamped on the axis
        lam, model_side = lam[1:], model_side[1:]
    assert torch.allclose(lam, model_side, rtol=0, atol=1e-12)
    fine = torch.linspace(0.0, 0.998, 4001, dtype=torch.float64)  # constant above the last DDPM step
    curve = sch.log_snr(fine)
    assert bool((curve[1:] < curve[:-1]).all())  # strictly decreasing: an edge between two steps has its own value
    back = sch.t_from_log_snr(curve)
    assert torch.allclose(back, fine, atol=1e-4)
    # the estimators' windows live on the same axis: center = log-SNR midpoint, t fields = its inverse
    grid = np.linspace(0.05, 0.95, 19)
    w = estimators.half_max_window("w", "symmetry_breaking", grid,
                                   np.exp(-((grid - 0.5) ** 2) / 0.02)[None].repeat(3, 0), sch)
    assert w.log_snr_center == pytest.approx((w.log_snr_start + w.log_snr_end) / 2, abs=1e-12)
    assert w.center == pytest.approx(float(sch.t_from_log_snr(w.log_snr_center)), abs=1e-12)
    assert w.t_start == pytest.approx(float(sch.t_from_log_snr(w.log_snr_start)), abs=1e-12)
    assert w.uncertainty == pytest.approx(w.log_snr_uncertainty / sch.log_snr_slope(w.center), rel=1e-9)


# -- one radius check --------------------------------------------------------------------------


def test_one_radius_check_with_three_bounds():
    check_radius([0, 6], (8, 8), bound="local")
    check_radius(7, (8, 8), bound="grid")
    check_radius(1 << 20, (8, 8))  # "any": a huge radius is the global model through the window path
    with pytest.raises(UserError, match="Radius 7 is out of range.*0..6.*already global"):
        check_radius(7, (8, 8), bound="local", model="m")
    with pytest.raises(UserError, match="Radius 8 is out of range.*0..7"):
        check_radius(8, (4, 8), bound="grid")
    with pytest.raises(UserError, match="non-negative integer"):
        check_radius(1.5, (8, 8))
    with pytest.raises(UserError, match="Radius -1 is out of range"):
        check_radius(torch.tensor([2, -1]), (8, 8))


# -- summary.json has one owner ----------------------------------------------------------------


def test_summary_write_read_validate_and_version(tmp_path):
    s = {"model": "m", "critical_window": {"t_start": 0.2, "t_end": 0.5}, "suggested_radius": 2, "x": float("nan")}
    path = summary.write(s, tmp_path / "summary.json")
    back = summary.read(tmp_path, "m")  # a folder means its summary.json
    assert back["schema"] == summary.SCHEMA and back["x"] is None  # NaN -> null
    assert summary.critical_window(back) == (0.2, 0.5) and summary.suggested_radius(back) == 2
    with pytest.raises(UserError, match="measured on 'm', not on 'other'"):
        summary.read(path, "other")
    path.write_text(json.dumps({**back, "schema": "critsample.detect.summary/99"}))
    with pytest.raises(UserError, match="newer critsample"):
        summary.read(path)
    path.write_text(json.dumps({**back, "schema": "something.else/1"}))
    with pytest.raises(UserError, match="not a critsample summary"):
        summary.read(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        summary.read(path)


# -- the CLI's error policy ----------------------------------------------------------------------


def test_cli_turns_user_errors_into_exit_2_and_keeps_tracebacks_of_bugs(monkeypatch, capsys, tmp_path):
    def user_error(*a, **kw):
        raise UserError("Bad input, with the fix.")

    def bug(*a, **kw):
        raise ValueError("an internal invariant broke")

    argv = ["detect", "--out", str(tmp_path), "--no-wandb"]
    monkeypatch.setattr(detect, "run", user_error)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "critsample: error: Bad input, with the fix."
    monkeypatch.setattr(detect, "run", bug)  # a ValueError is a bug, not a user error: it keeps its traceback
    with pytest.raises(ValueError, match="internal invariant"):
        main(argv)
    assert "internal error" in capsys.readouterr().err


# -- the dependency graph -----------------------------------------------------------------------


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Module names a file imports (relative imports resolved against its package). ``top_level_only``: only the
    imports that run when the module is imported (not inside functions or ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(ROOT).with_suffix("").parts
    pkg = ".".join(parts if parts[-1] == "__init__" else parts[:-1]).removesuffix(".__init__")
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_no_upward_imports_and_no_command_module_as_api():
    """The library never imports the commands or the CLI; tests and benches import the library only."""
    for path in (ROOT / "critsample").rglob("*.py"):
        rel = path.relative_to(ROOT / "critsample").as_posix()
        if rel.startswith("commands/") or rel == "cli.py":
            continue
        bad = {m for m in _imports(path) if m.startswith(("critsample.commands", "critsample.cli"))}
        assert not bad, (rel, bad)
        if rel.startswith(("probes/", "noise", "denoisers", "sampling", "plans", "summary", "store")):
            assert not {m for m in _imports(path) if m.startswith("critsample.detect")}, rel
    for folder in ("tests", "bench"):
        for path in (ROOT / folder).glob("*.py"):
            bad = {m for m in _imports(path) if m.startswith("critsample.commands")}
            assert not bad, (path.name, bad)


def test_no_import_circles():
    """The graph of import-time imports between critsample's modules has no cycle (a submodule importing its own
    package is not an edge: Python initialises the package first)."""
    paths = {_module_name(p): p for p in (ROOT / "critsample").rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = {m for m in _imports(path, top_level_only=True) if m in paths}
        graph[name] = {m for m in targets if m != name and not name.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
