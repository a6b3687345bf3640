"""3D views of a ``he2st stack``: a static PNG (matplotlib) and one self-contained interactive HTML.

The HTML needs no library and no network: the points (x, y, z in µm, and each shown gene's value
quantised to 0..255) are written into the page as JSON, and a few lines of canvas script draw them
with an orthographic projection, depth-sorted; drag (mouse, pen or finger: pointer events) rotates, the
wheel zooms, a menu picks the gene.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import anndata as ad
import numpy as np
from matplotlib.figure import Figure

from he2st.errors import He2stError
from he2st.io import write_text_atomic
from he2st.report.plots import informative_genes, save_figure

MAX_POINTS = 20000  # keeps the page small (a few hundred kB) and the canvas smooth


def stack_genes(adata: ad.AnnData, genes: list[str] | None, n: int = 6) -> list[str]:
    """The genes to show: those asked for (each must be in the stack), else the ``n`` that vary most over it."""
    if genes:
        unknown = [g for g in genes if g not in set(adata.var_names)]
        if unknown:
            raise He2stError(f"gene(s) {', '.join(unknown)} not in the stack")
        return list(genes)
    values = np.asarray(adata.X, dtype=np.float64)
    return informative_genes(values, list(adata.var_names), n)


def draw_stack_png(adata: ad.AnnData, path: str | Path, gene: str) -> Path:
    """One gene over the stack in 3D (sections as planes; interpolated planes fainter)."""
    xyz = np.asarray(adata.obsm["spatial_3d"], dtype=np.float64)
    values = np.asarray(adata[:, gene].X, dtype=np.float64).ravel()
    interpolated = adata.obs["interpolated"].to_numpy(bool)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot(projection="3d")
    lo, hi = np.nanpercentile(values, [1, 99]) if len(values) else (0.0, 1.0)
    for mask, alpha in ((interpolated, 0.25), (~interpolated, 0.9)):
        art = ax.scatter(xyz[mask, 0] / 1000, xyz[mask, 1] / 1000, xyz[mask, 2], c=values[mask], cmap="viridis",
                         vmin=lo, vmax=hi, s=2, alpha=alpha, depthshade=False)
    ax.invert_yaxis()  # image rows grow downwards
    ax.set_xlabel("x (mm)")
    ax.set_ylabel("y (mm)")
    ax.set_zlabel("z (µm)")
    ax.set_title(f"{gene}: predicted over {adata.obs['section'].nunique()} planes")
    fig.colorbar(art, ax=ax, shrink=0.6, label=gene)
    return save_figure(fig, path)


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font:14px sans-serif;margin:12px}}
canvas{{border:1px solid #ccc;cursor:grab;touch-action:none}}</style></head><body>
<h3>{title}</h3><p>gene <select id="g"></select> &nbsp; drag to rotate, wheel to zoom; x, y, z in µm
(z exaggerated x<span id="ez"></span>)</p><canvas id="c" width="800" height="640"></canvas>
<script>
const D={data};
const C=[[68,1,84],[72,40,120],[62,74,137],[49,104,142],[38,130,142],[31,158,137],[53,183,121],[109,205,89],
[180,222,44],[253,231,37]];
const cv=document.getElementById("c"),cx=cv.getContext("2d"),sel=document.getElementById("g");
document.getElementById("ez").textContent=D.ez.toFixed(1);
D.genes.forEach((g,i)=>{{const o=document.createElement("option");o.value=i;o.textContent=g;sel.appendChild(o);}});
let yaw=0.6,pitch=0.9,zoom=1,drag=null;
function col(v){{const t=v/255*(C.length-1),i=Math.min(Math.floor(t),C.length-2),f=t-i;
 return "rgb("+C[i].map((a,k)=>Math.round(a+(C[i+1][k]-a)*f)).join(",")+")";}}
function draw(){{const g=+sel.value,n=D.x.length,cy=Math.cos(yaw),sy=Math.sin(yaw),cp=Math.cos(pitch),sp=Math.sin(pitch);
 const s=zoom*0.9*Math.min(cv.width,cv.height)/D.r,P=new Array(n);
 for(let i=0;i<n;i++){{const x=D.x[i],y=D.y[i],z=D.z[i]*D.ez;const X=x*cy-y*sy,Y=x*sy+y*cy;
  P[i]=[cv.width/2+X*s,cv.height/2+(Y*cp-z*sp)*s,Y*sp+z*cp,i];}}
 P.sort((a,b)=>a[2]-b[2]);cx.clearRect(0,0,cv.width,cv.height);
 for(const p of P){{const v=D.v[g][p[3]];if(v===null)continue;cx.fillStyle=col(v);cx.globalAlpha=D.i[p[3]]?0.35:1;
  cx.fillRect(p[0]-1.5,p[1]-1.5,3,3);}}cx.globalAlpha=1;}}
cv.onpointerdown=e=>{{drag=[e.clientX,e.clientY];cv.setPointerCapture(e.pointerId);}};
cv.onpointerup=cv.onpointercancel=()=>{{drag=null;}};
cv.onpointermove=e=>{{if(!drag)return;yaw+=(e.clientX-drag[0])*0.01;pitch+=(e.clientY-drag[1])*0.01;
 drag=[e.clientX,e.clientY];draw();}};
cv.onwheel=e=>{{e.preventDefault();zoom*=e.deltaY<0?1.1:1/1.1;draw();}};sel.onchange=draw;draw();
</script></body></html>
"""


def _quantised(v: np.ndarray) -> list[int | None]:
    """``v`` on 0..255 between its 1st and 99th percentiles; a point without a value (NaN) is None (JSON null),
    which the page leaves undrawn, as the PNG does: coded as 0 it would look like the lowest expression."""
    finite = np.isfinite(v)
    if not finite.any():
        return [None] * len(v)
    lo, hi = np.percentile(v[finite], [1, 99])
    codes = np.clip(np.nan_to_num((v - lo) / (hi - lo if hi > lo else 1.0)) * 255, 0, 255).round().astype(int)
    return [c if ok else None for c, ok in zip(codes.tolist(), finite.tolist(), strict=True)]


def write_stack_html(adata: ad.AnnData, path: str | Path, genes: list[str], title: str = "he2st stack") -> Path:
    """The interactive page (see the module docstring); at most ``MAX_POINTS`` points, evenly subsampled."""
    rows = np.arange(adata.n_obs)
    if len(rows) > MAX_POINTS:
        rows = np.random.default_rng(0).choice(rows, MAX_POINTS, replace=False)
        rows.sort()
    xyz = np.asarray(adata.obsm["spatial_3d"], dtype=np.float64)[rows]
    centre = (xyz.max(axis=0) + xyz.min(axis=0)) / 2
    xyz = xyz - centre
    extent = float(max(np.ptp(xyz[:, 0]), np.ptp(xyz[:, 1]), 1.0))
    depth = float(np.ptp(xyz[:, 2]))
    exaggerate = max(1.0, 0.4 * extent / depth) if depth > 0 else 1.0  # a few sections µm apart stay visible
    values = []
    for gene in genes:
        values.append(_quantised(np.asarray(adata[rows, gene].X, dtype=np.float64).ravel()))
    data = {"x": xyz[:, 0].round(1).tolist(), "y": xyz[:, 1].round(1).tolist(), "z": xyz[:, 2].round(1).tolist(),
            "i": adata.obs["interpolated"].to_numpy(bool)[rows].astype(int).tolist(), "genes": genes, "v": values,
            "r": extent, "ez": exaggerate}
    path = Path(path)
    # "</" escaped (still valid JSON): a gene named like "</script>" must not end the page's script early
    script = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    write_text_atomic(path, _PAGE.format(title=html.escape(title), data=script))
    return path

