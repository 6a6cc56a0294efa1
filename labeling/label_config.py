"""Label Studio labeling config for the detector's review project.

The config is one image with one rectangle tool, under a header saying why the image was
chosen (the task's ``why``) and, when an approver sent the task back, why (``review``). Each
box can carry the reviewer's verdict (``VERDICT_NAME``, a per-region choice: the champion's
box correct, incorrect or adjusted, or one it missed), and the image a note (``NOTES_NAME``).
Predictions pushed to Label Studio and annotations read back refer to the tags by name, so the
names are module constants: ``FROM_NAME`` (the ``RectangleLabels`` control) and ``TO_NAME``
(the ``Image`` object).
"""

from __future__ import annotations

import colorsys
import xml.etree.ElementTree as ET

from visionloop.boxes import FROM_NAME, TO_NAME
from visionloop.models import BoxVerdict

IMAGE_VALUE = "$image"
"""Task data key holding the image URL (``task["data"]["image"]``)."""
WHY_VALUE = "$why"
"""Task data key of why the image was chosen (``labeling.tasks.WHY_KEY``), shown as a header;
a task without it (queued before) shows an empty header."""
REVIEW_VALUE = "$review"
"""Task data key of why an approver sent the task back (``labeling.review_actions``)."""
VERDICT_NAME = "box_verdict"
"""The per-region choice of the reviewer's verdict on one box."""
NOTES_NAME = "notes"
"""The reviewer's free-text note on the image (the queue row's ``reviewer_notes``)."""

# Well separated colours for the first classes; more classes get golden-ratio hues.
_PALETTE = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#dcbeff",
    "#9a6324",
    "#800000",
    "#aaffc3",
    "#808000",
    "#ffd8b1",
    "#000075",
    "#a9a9a9",
    "#ffe119",
    "#000000",
)


def class_colours(count: int) -> list[str]:
    """``count`` distinct ``#rrggbb`` colours, the same ones for the same count."""
    colours: list[str] = list(_PALETTE[:count])
    seen = set(colours)
    step = 0
    while len(colours) < count:
        hue = (step * 0.618033988749895) % 1.0
        lightness = (0.35, 0.5, 0.65)[(step // 7) % 3]
        r, g, b = colorsys.hls_to_rgb(hue, lightness, 0.75)
        colour = f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"
        step += 1
        if colour not in seen:
            seen.add(colour)
            colours.append(colour)
    return colours


def _check_class_names(class_names: list[str]) -> None:
    if not class_names:
        raise ValueError("a label config needs at least one class name (VISIONLOOP_CLASS_NAMES)")
    for name in class_names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {class_names}")


def build_label_config(class_names: list[str]) -> str:
    """Label Studio XML for drawing boxes of ``class_names`` on ``$image``.

    The XML is built with ``xml.etree`` so any character in a class name is escaped.
    """
    _check_class_names(class_names)
    view = ET.Element("View")
    ET.SubElement(view, "Header", {"value": WHY_VALUE, "size": "5"})
    ET.SubElement(view, "Header", {"value": REVIEW_VALUE, "size": "6", "style": "color: #c00"})
    ET.SubElement(view, "Image", {"name": TO_NAME, "value": IMAGE_VALUE})
    control = ET.SubElement(view, "RectangleLabels", {"name": FROM_NAME, "toName": TO_NAME})
    for name, colour in zip(class_names, class_colours(len(class_names))):
        ET.SubElement(control, "Label", {"value": name, "background": colour})
    verdicts = ET.SubElement(
        view,
        "Choices",
        {
            "name": VERDICT_NAME,
            "toName": TO_NAME,
            "perRegion": "true",
            "choice": "single",
            "showInline": "true",
        },
    )
    for verdict in BoxVerdict:
        ET.SubElement(verdicts, "Choice", {"value": verdict.value})
    ET.SubElement(
        view,
        "TextArea",
        {
            "name": NOTES_NAME,
            "toName": TO_NAME,
            "maxSubmissions": "1",
            "editable": "true",
            "placeholder": "Notes on this image (optional)",
        },
    )
    return ET.tostring(view, encoding="unicode")


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"not a valid Label Studio label config: {exc}") from exc


def _rectangle_control(root: ET.Element) -> ET.Element | None:
    for element in root.iter("RectangleLabels"):
        if element.get("name") == FROM_NAME:
            return element
    return None


def parse_label_config_classes(xml: str) -> list[str]:
    """The label values of a label config, in document order.

    Reads the ``RectangleLabels`` control named ``FROM_NAME`` when there is one, else every
    ``Label`` of the config.
    """
    root = _parse(xml)
    scope = _rectangle_control(root)
    labels = (scope if scope is not None else root).iter("Label")
    return [label.get("value", "") for label in labels]


def label_config_matches(xml: str, class_names: list[str]) -> bool:
    """Whether ``xml`` has our tag names wired together, the headers of why, the verdict and
    notes controls, and exactly ``class_names`` as labels (a config from before any of them is
    updated to show it)."""
    try:
        root = _parse(xml)
    except ValueError:
        return False
    control = _rectangle_control(root)
    if control is None or control.get("toName") != TO_NAME:
        return False
    images = [el for el in root.iter("Image") if el.get("name") == TO_NAME]
    if len(images) != 1 or images[0].get("value") != IMAGE_VALUE:
        return False
    headers = {el.get("value") for el in root.iter("Header")}
    if not {WHY_VALUE, REVIEW_VALUE} <= headers:
        return False
    verdicts = [el for el in root.iter("Choices") if el.get("name") == VERDICT_NAME]
    if len(verdicts) != 1 or verdicts[0].get("perRegion") != "true":
        return False
    if [c.get("value") for c in verdicts[0].iter("Choice")] != [v.value for v in BoxVerdict]:
        return False
    if not any(el.get("name") == NOTES_NAME for el in root.iter("TextArea")):
        return False
    return [label.get("value", "") for label in control.iter("Label")] == list(class_names)
