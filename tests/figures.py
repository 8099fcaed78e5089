"""Checks on the matplotlib figures a page embeds, read before they are saved: every data
axes shows all of its data inside its limits and big enough to see, and the labels name the
quantity. ``capture(monkeypatch)`` collects the figures the HTML writers turn into PNGs."""

import numpy as np

FILL = 0.1   # data must reach at least this fraction of its axes' height (the load-bar bug: 2%)
EDGE = 1e-6


def capture(monkeypatch) -> list:
    """Patch the PNG encoder shared by report.html, analysis.html and the compare report;
    the returned list fills with each figure (in page order) as it is embedded."""
    import divmoe.report.html as report_html

    figs, encode = [], report_html._fig_to_data_uri

    def keep(fig):
        figs.append(fig)
        fig.canvas.draw()  # limits and tick positions as they will be saved
        check_inside(fig)
        return encode(fig)

    monkeypatch.setattr(report_html, "_fig_to_data_uri", keep)
    return figs


def data_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and not hasattr(ax, "_colorbar")]


def colorbar_labels(fig) -> list[str]:
    return [ax.get_ylabel() or ax.get_xlabel() for ax in fig.axes if hasattr(ax, "_colorbar")]


def _to_axes(ax, transform, xy):
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    xy = xy[np.isfinite(xy).all(axis=1)]
    if not len(xy):
        return xy
    return ax.transAxes.inverted().transform(transform.transform(xy))


def _data_points(ax):
    """(points in axes coordinates that must lie inside, points that carry the data)."""
    inside, data = [], []
    for line in ax.get_lines():
        pts = _to_axes(ax, line.get_transform(), line.get_xydata())
        inside.append(pts)
        if line.get_transform() == ax.transData:  # axhline/axvline are references, not data
            data.append(pts)
    for patch in ax.patches:
        pts = _to_axes(ax, patch.get_transform(), patch.get_path().vertices)
        inside.append(pts)
        data.append(pts)
    for im in ax.images:
        x0, x1, y0, y1 = im.get_extent()
        pts = _to_axes(ax, ax.transData, [(x0, y0), (x1, y1)])
        inside.append(pts)
        data.append(pts)
    for coll in ax.collections:
        if hasattr(coll, "get_coordinates"):  # pcolormesh
            pts = _to_axes(ax, ax.transData, coll.get_coordinates())
        else:
            pts = _to_axes(ax, coll.get_offset_transform(), coll.get_offsets())
        inside.append(pts)
        data.append(pts)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros((0, 2))  # noqa: E731
    return cat(inside), cat(data)


def check_inside(fig) -> None:
    """Every data axes: all drawn points within its limits, and the data reaching at least
    FILL of the axes' height and width (bars drawn from 0 reach their tops)."""
    axes = data_axes(fig)
    assert axes, "figure has no visible data axes"
    for ax in axes:
        inside, data = _data_points(ax)
        name = ax.get_title() or fig.get_suptitle()
        assert len(data), f"{name!r}: nothing drawn"
        lo, hi = inside.min(axis=0), inside.max(axis=0)
        assert (lo >= -EDGE).all() and (hi <= 1 + EDGE).all(), \
            f"{name!r}: data outside the axes (axes coordinates {lo}..{hi})"
        span = data.max(axis=0) - np.minimum(data.min(axis=0), 0.0)
        top = data[:, 1].max()
        assert top >= FILL, f"{name!r}: data reaches only {top:.3f} of the axes' height " \
                            f"(y limits {ax.get_ylim()})"
        assert span[0] >= FILL or len(data) == 1, f"{name!r}: data spans {span[0]:.3f} of the width"
        for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
            box = text.get_window_extent()
            if text.get_text():
                assert box.x0 >= -1 and box.x1 <= fig.bbox.x1 + 1, \
                    f"{text.get_text()!r} runs off the figure ({box.x0:.0f}..{box.x1:.0f} of " \
                    f"{fig.bbox.x1:.0f} px)"


def check_labels(fig, x: str | None = None, y: str | None = None,
                 colorbar: str | None = None) -> None:
    """Some data axes' x label contains ``x`` (and likewise y); a colorbar's label contains
    ``colorbar``; every data axes has a y label or shares its row with one that has."""
    axes = data_axes(fig)
    if x is not None:
        assert any(x in ax.get_xlabel() for ax in axes), [ax.get_xlabel() for ax in axes]
    if y is not None:
        assert any(y in ax.get_ylabel() for ax in axes), [ax.get_ylabel() for ax in axes]
    if colorbar is not None:
        assert any(colorbar in lab for lab in colorbar_labels(fig)), colorbar_labels(fig)
    rows = {}
    for ax in axes:
        rows.setdefault(round(ax.get_position().y0, 3), []).append(bool(ax.get_ylabel()))
    assert all(any(r) for r in rows.values()), f"{fig.get_suptitle()!r}: a row of panels has " \
                                               f"no y label"
