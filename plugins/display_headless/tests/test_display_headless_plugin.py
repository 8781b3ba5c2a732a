"""The headless display's contract with the core."""

from __future__ import annotations

from vmm_display_headless.plugin import PLUGIN

from vmmcore.registry import Registry


def test_registered():
    rec = Registry(fresh=True).get("display", "headless")
    assert rec is not None and not rec.broken, rec and rec.error
    assert rec.spec is PLUGIN and rec.kind == "display"
    assert rec.policy_path.name == "headless.policy"


def test_open_display_builds_the_headless_backend(tmp_path):
    import io

    import numpy as np
    from PIL import Image
    from vmm_display_headless.headless import HeadlessDisplay

    from vmmcore.display import DisplayOptions, open_display

    shot = tmp_path / "s.png"
    d = open_display("headless", DisplayOptions(width=8, height=4, screenshot=shot,
                                                screenshot_interval=0))
    assert isinstance(d, HeadlessDisplay)
    d.set_scanout(0, 8, 4)
    rgb = np.arange(8 * 4 * 3, dtype=np.uint8).reshape(4, 8, 3)
    d.update(0, 0, 0, rgb)
    d.flush(0)
    assert d.wait_flush(0, 1, timeout=0.1)
    png = Image.open(io.BytesIO(d.screenshot(0)))
    assert png.size == (8, 4) and np.array_equal(np.asarray(png), rgb)
    d.update(0, 6, 3, rgb)                     # clipped at the edge, not an error
    assert np.array_equal(d.snapshot(0)[3, 6:], rgb[0, :2])
    d.close()
    assert Image.open(shot).size == (8, 4)


def test_input_reaches_an_attached_channel():
    from vmmcore.display import EV_KEY, EV_SYN, DisplayOptions, InputChannel, open_display

    d = open_display("headless", DisplayOptions(width=100, height=50))
    assert not d.key(30, True)                  # nothing attached: refused, no error
    chan = InputChannel("t")
    d.attach_input("keyboard", chan)
    d.attach_input("tablet", InputChannel("t2"))
    assert d.key(30, True)
    assert chan.receive() == [(EV_KEY, 30, 1), (EV_SYN, 0, 0)]
    assert d.pointer_absolute(0, 99, 49, {0x110: True})
    events = d._inputs["tablet"].receive()
    assert events[:2] == [(3, 0, 32767), (3, 1, 32767)] and (EV_KEY, 0x110, 1) in events
