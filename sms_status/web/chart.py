"""The overview's chart, drawn on the server: a stacked bar of messages per time bucket, one
segment per latest status, as plain numbers for the SVG in templates/dashboard/chart.html.

The SVG is scaled to the page's width by its viewBox; colours come from the stylesheet
(a class per status), since the pages' Content-Security-Policy allows no inline style.
"""

from datetime import datetime

# Stacked from the bottom: delivered first, the failures on top, where they are seen.
STATUS_ORDER = ("delivered", "read", "sent", "sending", "queued", "accepted", "scheduled",
                "canceled", "undelivered", "failed")
WIDTH, HEIGHT = 480, 200
# RIGHT leaves room for half a label under the last bar at a phone's font size (17 units,
# dashboard.css), where a date like "Nov 27" is about 60 units wide.
LEFT, RIGHT, TOP, BOTTOM = 44, 32, 10, 26
MAX_X_LABELS = 5


def status_class(status):
    """The CSS class of a status's colour; statuses this service does not know share one."""
    return f"status-{status}" if status in STATUS_ORDER else "status-other"


def ordered_statuses(statuses):
    """The statuses in stacking order; those this service does not know go below the
    final failures."""
    failures = STATUS_ORDER.index("canceled")
    return sorted(statuses, key=lambda status: (
        STATUS_ORDER.index(status) if status in STATUS_ORDER else failures - 0.5, status))


def nice_ceiling(value):
    """The smallest of 1, 2, 3, 4, 5, 6, 8, 10, 20, 30... at or above `value` (at least 1)."""
    step = 1
    while True:
        for factor in (1, 2, 3, 4, 5, 6, 8):
            if step * factor >= value:
                return step * factor
        step *= 10


def compact(count):
    """A count in at most about four characters, for the axis: 950, 1.5k, 40k, 1.2M."""
    for size, suffix in ((1_000_000, "M"), (1000, "k")):
        if count >= size:
            return f"{count / size:.1f}".removesuffix(".0") + suffix
    return str(count)


def x_labels(buckets, bucket_seconds):
    """(bucket number, text) of the labelled bars, at most MAX_X_LABELS: whole buckets only
    (the first starts with the window, at any time) at round times (buckets of hours are
    labelled by the days they start), every 1, 2, 3, 4, 6, 12 or 24 units apart."""
    daily = bucket_seconds >= 6 * 3600
    unit = 86400 if daily else bucket_seconds
    starts = {n: datetime.fromisoformat(bucket["start"]) for n, bucket in enumerate(buckets)}
    candidates = [n for n in starts if n and starts[n].timestamp() % unit == 0]
    for every in (1, 2, 3, 4, 6, 12, 24):
        chosen = [n for n in candidates if starts[n].timestamp() // unit % every == 0]
        if len(chosen) <= MAX_X_LABELS:
            break
    return [(n, starts[n].strftime("%b %d" if daily else "%H:%M")) for n in chosen]


def stacked_bars(buckets, bucket_seconds):
    """Everything the SVG draws: `bars` (per bucket, its segments: x, y, width, height,
    status, count), `y_ticks` and `x_labels` (x, y, text), and `statuses`, the legend."""
    top = nice_ceiling(max((bucket["total"] for bucket in buckets), default=0))
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_width / max(len(buckets), 1)
    bar_width = max(slot * 0.8, 1)
    statuses = ordered_statuses({s for bucket in buckets for s in bucket["counts"]})
    bars = []
    for n, bucket in enumerate(buckets):
        x, base = LEFT + n * slot + (slot - bar_width) / 2, TOP + plot_height
        segments = []
        for status in statuses:
            count = bucket["counts"].get(status, 0)
            if count:
                height = count / top * plot_height
                base -= height
                segments.append({"x": round(x, 2), "y": round(base, 2),
                                 "width": round(bar_width, 2), "height": round(height, 2),
                                 "status": status, "class": status_class(status),
                                 "count": count})
        bars.append({"start": bucket["start"], "stop": bucket["stop"],
                     "total": bucket["total"], "counts": bucket["counts"],
                     "segments": segments})
    y_ticks = [{"x": LEFT - 4, "y": round(TOP + plot_height * (1 - share), 2),
                "text": compact(round(top * share))}
               for share in ((0, 0.5, 1) if top % 2 == 0 else (0, 1))]
    labels = [{"x": round(LEFT + n * slot + slot / 2, 2), "y": HEIGHT - 6, "text": text}
              for n, text in x_labels(buckets, bucket_seconds)]
    return {"width": WIDTH, "height": HEIGHT, "left": LEFT, "right": WIDTH - RIGHT,
            "baseline": TOP + plot_height, "top": TOP, "bars": bars, "y_ticks": y_ticks,
            "x_labels": labels,
            "statuses": [{"status": s, "class": status_class(s)} for s in statuses]}
