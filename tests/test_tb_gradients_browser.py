"""The GRADIENTS tab in a real browser (headless Chromium): fresh train.py runs of the CNN and of the deep sigmoid
MLP (docs/gradients.md, shrunk to 14 steps), one coloured line per layer found in the chart's pixels, the heat
map's tooltip against the event files, the vanishing verdict marked on the sigmoid run, screenshots."""

import json
import shutil
import urllib.parse
import urllib.request

import pytest

from conftest import ONE_THREAD
from helpers import load_script, run_cli, tiny_mnist_args
from test_tb_gradients import raw_scalars

pytestmark = pytest.mark.slow  # two real runs and a browser: about a minute

tab = load_script("gradients_tab")
SIGMOID = ["model=mlp", "model.activation=sigmoid", "model.hidden=[64,64,64,64,64,64,64,64,64,64]",
           "optimizer=sgd", "optimizer.lr=0.05"]
PIXELS = """
const [run, family, colors, tolerance] = arguments;
const u = window.gradients.charts.find((c) => c.run === run && c.family === family);
const d = u.ctx.getImageData(0, 0, u.ctx.canvas.width, u.ctx.canvas.height).data;
const want = colors.map((c) => c.match(/\\d+/g).map(Number));
const counts = want.map(() => 0);
for (let p = 0; p < d.length; p += 4) {
  want.forEach((c, i) => {
    if (Math.abs(d[p] - c[0]) + Math.abs(d[p + 1] - c[1]) + Math.abs(d[p + 2] - c[2]) <= tolerance) counts[i]++;
  });
}
return counts;
"""
CHART = "window.gradients.charts.find((u) => u.run === {run!r} && u.family === {family!r})"


@pytest.fixture(scope="module")
def logdir(cnn_run, mnist_root, tmp_path_factory):
    """conftest's CNN run and a deep sigmoid MLP run, each as <name>/tensorboard + <name>/health.json."""
    out = tmp_path_factory.mktemp("sigmoid")
    proc = run_cli("train.py", *tiny_mnist_args(mnist_root, out), "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
                   "test=false", *SIGMOID, cwd=out, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sigmoid_dir,) = (out / "logs" / "train" / "runs").iterdir()
    root = tmp_path_factory.mktemp("logdir")
    for name, run_dir in (("cnn", cnn_run[0]), ("sigmoid", sigmoid_dir)):
        shutil.copytree(run_dir / "tensorboard", root / name / "tensorboard")
        shutil.copy(run_dir / "health.json", root / name / "health.json")
    return root


def view(base: str, run: str) -> dict:
    """The backend's answer, fetched here without the browser."""
    query = urllib.parse.urlencode({"run": run, "buckets": 1000})
    with urllib.request.urlopen(f"{base}/data/plugin/gradients/data?{query}", timeout=30) as r:
        return json.loads(r.read())


def layers(v: dict, key: str = "grad_norm") -> list[str]:
    (fam,) = [f for f in v["families"] if f["key"] == key]
    return [s["layer"] for s in fam["series"]]


def test_tab_in_a_real_browser(logdir, tmp_path):
    health = json.loads((logdir / "sigmoid" / "health.json").read_text())
    (vanishing,) = [f for f in health["findings"] if f["verdict"] == "vanishing"]  # the run is broken as planned
    assert json.loads((logdir / "cnn" / "health.json").read_text())["healthy"]
    cnn, sig = "cnn/tensorboard", "sigmoid/tensorboard"

    with tab.tensorboard(logdir) as base, tab.chromium(1400, 2000) as driver:
        seconds = tab.open_tab(driver, base)
        assert seconds < 60
        assert driver.execute_script("return window.gradients.selected") == [cnn]  # the first run, alone
        tab.screenshot(driver, tmp_path / "cnn.png")

        # One coloured series per layer, in depth order, every colour distinct and drawn in the chart's pixels.
        names = layers(view(base, cnn))
        legend = driver.execute_script(
            "return [...document.querySelectorAll('.chart[data-family=grad_norm] .legend .item')]"
            ".map((e) => [e.dataset.layer, e.dataset.color])")
        assert [layer for layer, _ in legend] == names
        colors = [c for _, c in legend]
        assert len(set(colors)) == len(names)
        series = driver.execute_script(f"return {CHART.format(run=cnn, family='grad_norm')}.series.slice(1)"
                                       ".map((s) => s.label)")
        assert series == names
        drawn = driver.execute_script(PIXELS, cnn, "grad_norm", colors, 6)
        assert all(n > 0 for n in drawn), dict(zip(names, drawn))

        # Hover the heat map: the tooltip names the cell's layer, step and value, equal to the event file's.
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        raw = raw_scalars(logdir / "cnn" / "tensorboard")
        heat = driver.execute_script(f"return window.gradients.heatmaps[{cnn!r}]")
        canvas = driver.find_element(By.CSS_SELECTOR, f".heatmap[data-run='{cnn}'] canvas")
        size = canvas.size
        step_lo = view(base, cnn)["range"][0]
        for layer, step in (("conv2.weight", 5), ("fc2.bias", 11)):
            r, k = names.index(layer), step - step_lo  # one column per step while the steps fit
            x = (k + 0.5) / heat["cols"] * size["width"] - size["width"] / 2
            y = (r + 0.5) * heat["rowH"] - size["height"] / 2
            ActionChains(driver).move_to_element_with_offset(canvas, round(x), round(y)).perform()
            tip = driver.find_element(By.CSS_SELECTOR, ".heatmap .tooltip")
            assert tip.is_displayed() and tip.get_attribute("data-layer") == layer
            assert int(tip.get_attribute("data-step")) == step
            assert float(tip.get_attribute("data-value")) == raw[f"grad_norm/{layer}"][step]
            assert tip.text.startswith(layer) and f"step {step}" in tip.text
        tab.screenshot(driver, tmp_path / "cnn_hover.png")

        # A click on a legend entry isolates its layer, a second click brings every layer back.
        item = driver.find_element(By.CSS_SELECTOR, ".chart[data-family=grad_norm] .legend .item[data-layer='fc1.weight']")
        shown = f"return {CHART.format(run=cnn, family='grad_norm')}.series.slice(1).map((s) => s.show)"
        item.click()
        assert driver.execute_script(shown) == [name == "fc1.weight" for name in names]
        item.click()
        assert all(driver.execute_script(shown))

        # Dragging across the heat map from step 3 to step 9 zooms every chart of the tab to those steps.
        before = driver.execute_script("return document.body.dataset.rendered")
        x3, x9 = ((s - step_lo + 0.5) / heat["cols"] * size["width"] - size["width"] / 2 for s in (3, 9))
        (ActionChains(driver).move_to_element_with_offset(canvas, round(x3), 0).click_and_hold()
         .move_to_element_with_offset(canvas, round(x9), 0).release().perform())
        tab.wait(driver, f"document.body.dataset.rendered !== {before!r}")
        assert driver.execute_script("return window.gradients.range") == [3, 9]
        scales = driver.execute_script("return window.gradients.charts.map((u) => [u.scales.x.min, u.scales.x.max])")
        assert scales and all(x == [3, 9] for x in scales)
        before = driver.execute_script("return document.body.dataset.rendered")
        driver.find_element(By.ID, "reset-zoom").click()
        tab.wait(driver, f"document.body.dataset.rendered !== {before!r}")

        # The sigmoid run beside it: its vanishing verdict on its gradient-norm chart, none on the healthy CNN.
        tab.select_runs(driver, [cnn, sig])
        assert driver.execute_script("return window.gradients.selected") == [cnn, sig]
        marks = driver.execute_script(
            "return [...document.querySelectorAll('.column .verdict')].map((e) => "
            "[e.closest('.column').dataset.run, e.closest('.chart').dataset.family, e.dataset.verdict, e.dataset.layer])")
        assert [sig, "grad_norm", "vanishing", vanishing["layer"]] in marks
        assert not [m for m in marks if m[0] == cnn]
        assert driver.execute_script(f"return !!document.querySelector('.healthy[data-run=\"{cnn}\"]')")
        red = ["rgb(214,39,40)"]  # the verdict's step range: a red strip along the chart's top
        assert driver.execute_script(PIXELS, sig, "grad_norm", red, 60)[0] > 50
        assert driver.execute_script(PIXELS, cnn, "grad_norm", red, 60)[0] == 0
        sig_names = layers(view(base, sig))
        assert len(sig_names) == 22  # 11 linear layers, weight and bias
        assert driver.execute_script(f"return {CHART.format(run=sig, family='grad_norm')}.series.length") == 23
        shot = tab.screenshot(driver, tmp_path / "side_by_side.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
