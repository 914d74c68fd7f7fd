"""The report pictures: SVG well-formed with one group per node, PNG decodes."""
from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import pytest

from sendtrail.api.render import node_count_summary, render_png, render_svg

NS = "{http://www.w3.org/2000/svg}"

REPORT = {
    "automation": {"automation_id": "a1", "name": "Spring <Promo> & \"Friends\""},
    "period": {"from": "2024-03-01T00:00:00.000Z", "to": None},
    "nodes": [
        {"step_index": 0, "name": "Welcome", "kind": "email", "done": 10, "waiting": 2, "filtered": 0, "stopped": 1},
        {"step_index": 1, "name": "Tips & <tricks>", "kind": "email", "done": 4, "waiting": 4, "filtered": 1,
         "stopped": 1},
        {"step_index": 2, "name": "A very long step name that does not fit on one card at all", "kind": "condition",
         "done": 2_345_678, "waiting": 1, "filtered": 0, "stopped": 0},
    ],
    "completion": {"completed": 2, "in_progress": 7, "not_started": 3},
    "statuses": {},
}


def test_svg_is_well_formed_with_one_group_per_node():
    svg = render_svg(REPORT)
    root = ET.fromstring(svg.encode())
    assert root.tag == NS + "svg"
    groups = [g for g in root.iter(NS + "g") if g.get("class") == "node"]
    assert [g.get("data-step-index") for g in groups] == ["0", "1", "2"]
    for group, node in zip(groups, REPORT["nodes"]):
        counts = {c.get("data-state"): int(c.get("data-count")) for c in group if c.get("class") == "count"}
        assert counts == {k: node[k] for k in ("done", "waiting", "filtered", "stopped")}
        texts = " ".join(t.text or "" for t in group.iter(NS + "text"))
        for state in ("done", "waiting", "filtered", "stopped"):
            assert state in texts
    text = "".join(root.itertext())
    assert 'Spring <Promo> & "Friends"' in text  # escaped in the XML, intact once parsed
    assert "2.3M" in text and "10" in text
    assert len(root.findall(f"{NS}path[@class='edge']")) == 2  # arrows between the nodes


def test_svg_without_steps():
    root = ET.fromstring(render_svg({"automation": {"name": "Empty"}, "nodes": []}).encode())
    assert not [g for g in root.iter(NS + "g") if g.get("class") == "node"]
    assert "no steps" in "".join(root.itertext())


@pytest.mark.parametrize("scale", [1, 2])
def test_png_decodes_with_sane_size(scale):
    from PIL import Image

    png = render_png(REPORT, scale=scale)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    img.load()
    w, h = img.size
    assert w == 760 * scale and 300 * scale < h < 800 * scale
    assert img.mode == "RGB"
    # not a blank image: the cards and badges draw several colours
    assert len(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).getcolors()) > 4


def test_png_grows_with_nodes():
    from PIL import Image

    many = dict(REPORT, nodes=[dict(REPORT["nodes"][0], step_index=i) for i in range(12)])
    small = Image.open(io.BytesIO(render_png(REPORT, scale=1))).size[1]
    big = Image.open(io.BytesIO(render_png(many, scale=1))).size[1]
    assert big > small * 2


def test_node_count_summary():
    assert node_count_summary(REPORT["nodes"])[1] == (1, {"done": 4, "waiting": 4, "filtered": 1, "stopped": 1})
