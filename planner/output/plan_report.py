"""Draw a Plan: a text picture a person reads at a glance (rich, exported as plain text) and the same picture as a
hand-written SVG. Takes Plan values, never recomputes a placement.

Per GPU: a memory bar over the GPU's total bytes, one letter (and colour) per model, one run of letters per replica,
``.`` for usable bytes left and ``:`` for the part kept back (headroom and reserve), then used / usable / total.
Per model: quantization, bytes per replica, replicas placed/min/max and where. Then CPU replicas, offloaded
replicas, the per-node start order, notes and how the solver did.
"""

from __future__ import annotations

import io
from xml.sax.saxutils import escape

from planner.placement.packing import GpuPlan, Plan
from planner.units import GiB, format_bytes

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# (rich colour, SVG hex) pairs, distinguishable on light and dark terminals
PALETTE = [
    ("dodger_blue1", "#1e90ff"),
    ("green3", "#00c000"),
    ("dark_orange", "#ff8c00"),
    ("magenta", "#d000d0"),
    ("gold1", "#e0b000"),
    ("red1", "#e02020"),
    ("cyan3", "#00b0b0"),
    ("medium_purple", "#8870db"),
    ("chartreuse3", "#5faf00"),
    ("hot_pink", "#ff69b4"),
    ("steel_blue", "#4682b4"),
    ("orange_red1", "#ff4500"),
]
BAR = 44  # characters for a GPU's total memory


def _model_keys(plan: Plan) -> dict[str, tuple[str, str, str]]:
    """model name -> (letter, rich colour, hex colour), in the plan's model order."""
    out = {}
    for i, m in enumerate(plan.models):
        letter = LETTERS[i] if i < len(LETTERS) else "#"
        rich_c, hex_c = PALETTE[i % len(PALETTE)]
        out[m.name] = (letter, rich_c, hex_c)
    return out


def _segments(g: GpuPlan, width: int) -> list[tuple[str | None, int]]:
    """(model or None for free / "__kept" for headroom+reserve, chars) over ``width`` chars of g.total_bytes.
    Cumulative rounding keeps the pieces adding up; every replica gets at least one char when there is room."""
    total = max(1, g.total_bytes)
    pieces: list[tuple[str | None, int]] = [(r.model, r.bytes) for r in g.replicas]
    pieces.append((None, max(0, g.usable_bytes - g.used_bytes)))
    pieces.append(("__kept", max(0, g.total_bytes - g.usable_bytes)))
    out = []
    cum = 0
    prev = 0
    n_rep = len(g.replicas)
    for i, (who, b) in enumerate(pieces):
        cum += b
        pos = min(width, round(cum / total * width))
        if i < n_rep:
            pos = max(pos, prev + 1) if prev + 1 <= width - (n_rep - i - 1) else pos
        pos = max(pos, prev)
        out.append((who, pos - prev))
        prev = pos
    if prev < width:
        who, k = out[-1]
        out[-1] = (who, k + width - prev)
    return out


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def _rows(plan: Plan, max_rows: int) -> list[tuple[str, GpuPlan, int]]:
    """(label, a representative GPU, how many share this layout). GPUs are listed one per row up to max_rows;
    beyond that, GPUs with the same layout (type, sizes, replicas) are grouped."""
    gpus = list(plan.gpus)
    if len(gpus) <= max_rows:
        return [(g.id, g, 1) for g in gpus]
    groups: dict = {}
    for g in gpus:
        key = (g.gpu_type, g.total_bytes, g.usable_bytes, tuple((r.model, r.bytes) for r in g.replicas))
        groups.setdefault(key, []).append(g)
    rows = []
    for key, gs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0].id)):
        label = gs[0].id if len(gs) == 1 else f"{gs[0].id} +{len(gs) - 1} alike"
        rows.append((label, gs[0], len(gs)))
    return rows


def mixed_node_lines(plan: Plan) -> list[str]:
    """A line per node whose GPUs differ in usable size: Ray picks the GPU inside a node, so every replica there is
    planned against the node's smallest GPU (``ray_basis_bytes``)."""
    by_node: dict[str, list[GpuPlan]] = {}
    for g in plan.gpus:
        by_node.setdefault(g.node, []).append(g)
    out = []
    for node, gs in by_node.items():
        if len({g.usable_bytes for g in gs}) < 2:
            continue
        sizes = {}
        for g in sorted(gs, key=lambda g: g.usable_bytes):
            sizes.setdefault(g.gpu_type or g.name, g.usable_bytes)
        basis = min(g.ray_basis_bytes or g.usable_bytes for g in gs)
        kinds = ", ".join(f"{t} {format_bytes(b)}" for t, b in sizes.items())
        out.append(f"node {node} mixes GPU sizes ({kinds} usable): Ray picks the GPU inside a node, so every replica "
                   f"there is planned against {format_bytes(basis)}; run each GPU type as its own Ray node to plan "
                   "the larger ones at their size")
    return out


def render_text(plan: Plan, *, width: int = 100, max_rows: int = 40) -> str:
    """The plan as text for a terminal (rich markup rendered, then exported as plain text)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=False, color_system=None)
    keys = _model_keys(plan)
    s = plan.solver
    placed = sum(m.placed_replicas for m in plan.models)
    head = Text()
    head.append("gpuplan", style="bold")
    if plan.mode == "gpu":
        head.append(
            f"  {len(plan.gpus)} GPU{'s' if len(plan.gpus) != 1 else ''}, {placed} replicas placed "
            f"(min {sum(m.min_replicas for m in plan.models)}, max {sum(m.max_replicas for m in plan.models)})"
            f"  headroom {plan.headroom:.0%}, reserve {format_bytes(plan.gpu_reserve_bytes)}/GPU"
        )
    else:
        head.append(f"  CPU only: {placed} CPU replicas  headroom {plan.headroom:.0%} of each node's RAM")
    console.print(head)

    if plan.gpus:
        console.print(
            Text("memory bar over each GPU's total; then used/usable/total GiB and the sum of Ray num_gpus", style="dim")
        )
        console.print()
        rows = _rows(plan, max_rows)
        label_w = min(30, max(len(r[0]) for r in rows))
        for label, g, count in rows:
            line = Text()
            line.append(f"{label[:label_w]:<{label_w}} ", style="bold")
            line.append(f"{(g.gpu_type or '')[:9]:<9} ")
            line.append("[")
            for who, k in _segments(g, BAR):
                if k <= 0:
                    continue
                if who is None:
                    line.append("." * k, style="dim")
                elif who == "__kept":
                    line.append(":" * k, style="dim")
                else:
                    letter, color, _ = keys.get(who, ("?", "white", "#888"))
                    line.append(letter * k, style=f"bold {color}")
            line.append("] ")
            line.append(f"{_gib(g.used_bytes)}/{_gib(g.usable_bytes)}/{_gib(g.total_bytes)} GiB")
            line.append(f"  {g.num_gpus_used:.4f} gpu", style="dim")
            console.print(line, overflow="crop", no_wrap=True)
        legend = Text("  ")
        for m in plan.models:
            letter, color, _ = keys[m.name]
            legend.append(letter, style=f"bold {color}")
            legend.append(f"={m.name}  ")
        legend.append(". free  : kept back", style="dim")
        console.print(legend)
        for ln in mixed_node_lines(plan):
            console.print(Text("  note: " + ln, style="dim"), overflow="fold")

    console.print()
    t = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
    t.add_column("", no_wrap=True)
    t.add_column("model", overflow="fold")
    t.add_column("quant", no_wrap=True)
    t.add_column("per replica", justify="right", no_wrap=True)
    t.add_column("placed", justify="right", no_wrap=True)
    t.add_column("min", justify="right", no_wrap=True)
    t.add_column("max", justify="right", no_wrap=True)
    t.add_column("where", overflow="fold")
    for m in plan.models:
        letter, color, _ = keys[m.name]
        where = []
        if m.gpu_replicas:
            where.append(f"{m.gpu_replicas} on {m.gpus_used} GPU{'s' if m.gpus_used != 1 else ''}/{m.nodes_used} node{'s' if m.nodes_used != 1 else ''}")
        if m.offload_replicas:
            where.append(f"{m.offload_replicas} split GPU+CPU")
        if m.cpu_replicas:
            where.append(f"{m.cpu_replicas} on CPU")
        if m.num_gpus_by_gpu_type:
            where.append("num_gpus " + ", ".join(f"{k}={v}" for k, v in m.num_gpus_by_gpu_type))
        short = m.placed_replicas < m.min_replicas
        t.add_row(
            Text(letter, style=f"bold {color}"),
            m.name + (f" [{m.gpu_type}]" if m.gpu_type else ""),
            m.quantization + ("" if m.option_rank == 0 else f" (#{m.option_rank + 1})"),
            format_bytes(m.replica_bytes),
            Text(str(m.placed_replicas), style="bold red" if short else "bold"),
            str(m.min_replicas),
            str(m.max_replicas),
            "; ".join(where) or "-",
        )
    console.print(t)

    if plan.cpu_replicas:
        console.print()
        console.print(Text("CPU replicas", style="bold"))
        by: dict = {}
        for c in plan.cpu_replicas:
            by.setdefault((c.node, c.model, c.bytes), 0)
            by[(c.node, c.model, c.bytes)] += 1
        for (node, model, b), k in by.items():
            console.print(f"  {node}: {k} x {model} ({format_bytes(b)} RAM each)")
    if plan.offload:
        console.print()
        console.print(Text("Split GPU+CPU replicas (max_memory)", style="bold"))
        for o in plan.offload:
            console.print(
                f"  {o.model} on {o.gpu}: {format_bytes(o.gpu_bytes)} GPU + {format_bytes(o.cpu_bytes)} CPU "
                f"(num_gpus {o.num_gpus})"
            )

    why = [(m.name, m.why_quantization) for m in plan.models if m.option_rank > 0]
    if why:
        console.print()
        console.print(Text("Quantization", style="bold"))
        for name, w in why:
            console.print(f"  {name}: {w}")
    if plan.notes:
        console.print()
        console.print(Text("Notes", style="bold"))
        for n in plan.notes:
            console.print(f"  - {n}")
    console.print()
    console.print(
        Text(
            f"solver: quantization search {s.quantization_search}, minimums {s.min_placement}, fill {s.fill}; "
            f"{s.status}; {s.seconds:.2f} s",
            style="dim",
        )
    )
    return console.export_text()


def render_svg(plan: Plan, *, max_rows: int = 40) -> str:
    """The same picture as a standalone SVG document (no external fonts, scripts or images)."""
    keys = _model_keys(plan)
    W = 1000
    bar_x, bar_w = 250, 480
    row_h = 26
    y = 20
    parts: list[str] = []

    def text(x, y, s, size=13, weight="normal", fill="#222", anchor="start"):
        parts.append(
            f'<text x="{x}" y="{y}" font-family="monospace" font-size="{size}" font-weight="{weight}" '
            f'fill="{fill}" text-anchor="{anchor}">{escape(str(s))}</text>'
        )

    placed = sum(m.placed_replicas for m in plan.models)
    y += 6
    if plan.mode == "gpu":
        text(
            10,
            y,
            f"gpuplan: {len(plan.gpus)} GPUs, {placed} replicas placed; headroom {plan.headroom:.0%}, reserve "
            f"{format_bytes(plan.gpu_reserve_bytes)}/GPU",
            15,
            "bold",
        )
    else:
        text(10, y, f"gpuplan: CPU only, {placed} CPU replicas; headroom {plan.headroom:.0%} of RAM", 15, "bold")
    y += 20
    for label, g, count in _rows(plan, max_rows):
        y += row_h
        text(10, y - 8, label[:30], 12, "bold")
        text(bar_x - 10, y - 8, (g.gpu_type or "")[:10], 12, anchor="end")
        total = max(1, g.total_bytes)
        x = float(bar_x)
        parts.append(
            f'<rect x="{bar_x}" y="{y - 22}" width="{bar_w}" height="18" fill="#f4f4f4" stroke="#999" '
            'stroke-width="1"/>'
        )
        for r in g.replicas:
            w = r.bytes / total * bar_w
            letter, _, color = keys.get(r.model, ("?", "", "#888"))
            title = f"{r.model}: {format_bytes(r.bytes)}, num_gpus {r.num_gpus}" + (" (split GPU+CPU)" if r.offload else "")
            parts.append(
                f'<rect x="{x:.2f}" y="{y - 22}" width="{max(w, 0.5):.2f}" height="18" fill="{color}" '
                f'stroke="#fff" stroke-width="0.5"><title>{escape(title)}</title></rect>'
            )
            if w >= 12:
                text(f"{x + w / 2:.2f}", y - 8, letter, 12, "bold", "#fff", "middle")
            x += w
        kept_x = bar_x + g.usable_bytes / total * bar_w
        parts.append(
            f'<rect x="{kept_x:.2f}" y="{y - 22}" width="{bar_x + bar_w - kept_x:.2f}" height="18" fill="#cccccc" '
            'fill-opacity="0.7"><title>headroom + reserve</title></rect>'
        )
        parts.append(
            f'<line x1="{kept_x:.2f}" y1="{y - 24}" x2="{kept_x:.2f}" y2="{y - 2}" stroke="#444" stroke-width="1.5"/>'
        )
        text(
            bar_x + bar_w + 10,
            y - 8,
            f"{_gib(g.used_bytes)}/{_gib(g.usable_bytes)}/{_gib(g.total_bytes)} GiB  {g.num_gpus_used:.4f} gpu",
            12,
        )
    if plan.gpus:
        y += 24
        x = 10
        for m in plan.models:
            letter, _, color = keys[m.name]
            parts.append(f'<rect x="{x}" y="{y - 11}" width="12" height="12" fill="{color}"/>')
            label = f"{letter}={m.name}"
            text(x + 16, y, label, 12)
            x += 16 + 8 * len(label) + 14
            if x > W - 150:
                x = 10
                y += 18
        text(x, y, "grey = headroom + reserve", 11, fill="#666")
    y += 30
    text(10, y, "model", 12, "bold")
    text(260, y, "quant", 12, "bold")
    text(380, y, "per replica", 12, "bold")
    text(500, y, "placed / min / max", 12, "bold")
    text(660, y, "where", 12, "bold")
    for m in plan.models:
        y += 18
        letter, _, color = keys[m.name]
        parts.append(f'<rect x="10" y="{y - 11}" width="12" height="12" fill="{color}"/>')
        text(28, y, (m.name + (f" [{m.gpu_type}]" if m.gpu_type else ""))[:28], 12)
        text(260, y, m.quantization + ("" if m.option_rank == 0 else f" (#{m.option_rank + 1})"), 12)
        text(380, y, format_bytes(m.replica_bytes), 12)
        short = m.placed_replicas < m.min_replicas
        text(500, y, f"{m.placed_replicas} / {m.min_replicas} / {m.max_replicas}", 12, "bold", "#c00" if short else "#222")
        where = []
        if m.gpu_replicas:
            where.append(f"{m.gpu_replicas} on {m.gpus_used} GPUs/{m.nodes_used} nodes")
        if m.offload_replicas:
            where.append(f"{m.offload_replicas} split")
        if m.cpu_replicas:
            where.append(f"{m.cpu_replicas} CPU")
        text(660, y, "; ".join(where) or "-", 12)
    if plan.notes:
        y += 28
        text(10, y, "notes", 12, "bold")
        for n in plan.notes[:20]:
            y += 16
            text(10, y, ("- " + n)[:150], 11, fill="#444")
    y += 20
    H = y + 10
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">\n'
        f'<rect width="{W}" height="{H}" fill="#ffffff"/>\n' + "\n".join(parts) + "\n</svg>\n"
    )
