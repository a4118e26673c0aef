"""Side-by-side comparison of OverLoCK and its baselines (MogaNet, UniRepLKNet) in one pipeline.

For a task (``det``: Cascade Mask R-CNN MS 3x; ``seg``: UperNet 160k) and a size group, the tool
builds every model from its config under ``configs/`` (same detector/segmentor, different
backbone) and measures, in one run on the current device:

* parameters (whole model, and backbone);
* FLOPs with the protocol of the published tables (see :func:`flops_proxy`) at the published
  1280x800 / 2048x512 inputs, counted on the meta device (nothing runs; the op set and formulas of
  mmengine's ``FlopAnalyzer``, which ``--flops-counter mmengine`` runs on a real trace instead),
  next to the published figure and the relative difference;
* inference throughput (``predict`` mode, eval, no grad; re-parameterised unless
  ``--no-reparam``) and training throughput (loss, backward, AdamW step) on synthetic batches of
  ``--shape``, with the peak memory of each phase (CUDA: ``max_memory_allocated``; CPU: growth of
  the peak resident set size over the process before the model was built, each model measured in
  a forked child so peaks do not mix);

and writes ``compare_<task>_<size>.md`` (table + notes), ``.png`` (published accuracy vs FLOPs and
vs measured inference throughput) and ``.json`` (raw numbers) under ``--out-dir``. Published
accuracy, parameters and FLOPs come from ``docs/spec/RESULTS.md`` (the authors' papers).

Examples::

    python tools/analysis/compare_report.py                       # det, size s, CPU-friendly
    python tools/analysis/compare_report.py --task seg --size t --shape 512 512 --iters 20
    python tools/analysis/compare_report.py --task det --size all --skip-train

Throughputs with random weights: detections are few (scores below the threshold), so the mask
head barely runs at inference for every model alike; the cascade box heads always run on the
RPN's proposals.
"""
import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

DET_CFG = 'configs/mmdet/cascade-mask-rcnn_{}_fpn_4conv1fc-giou_8xb2-ms-crop-3x_coco.py'
SEG_CFG = 'configs/mmseg/upernet_{}_8xb2-160k_ade20k-512x512.py'

#: Published numbers (docs/spec/RESULTS.md; the authors' papers). ``acc``: box AP / mask AP
#: (det, Cascade Mask R-CNN MS 3x, GIoU 4conv1fc heads) or single-scale mIoU (seg, UperNet 160k).
#: OverLoCK released no Cascade numbers; the paper states OverLoCK-S is 1.0 box AP above
#: MogaNet-B's 52.6, hence 53.6 (mask AP not stated).
PUBLISHED = {
    'det': {
        'OverLoCK-T': dict(),
        'OverLoCK-S': dict(acc=(53.6, None), note='paper: MogaNet-B + 1.0 box AP'),
        'OverLoCK-B': dict(),
        'MogaNet-S': dict(acc=(51.7, 45.1), params=82.8, flops=750.2),
        'MogaNet-B': dict(acc=(52.6, 46.0), params=101.2, flops=851.6),
        'UniRepLKNet-T': dict(acc=(51.7, 44.9), params=89., flops=749.),
        'UniRepLKNet-S': dict(acc=(53.0, 45.9), params=113., flops=835.),
    },
    'seg': {
        'OverLoCK-T': dict(acc=(50.3,)),
        'OverLoCK-S': dict(acc=(51.3,)),
        'OverLoCK-B': dict(acc=(51.7,)),
        'MogaNet-S': dict(acc=(49.2,), params=55.3, flops=946.4),
        'MogaNet-B': dict(acc=(50.1,), params=73.7, flops=1050.4),
        'UniRepLKNet-T': dict(acc=(48.6,), params=61., flops=946.),
        'UniRepLKNet-S': dict(acc=(50.5,), params=86., flops=1036.),
    },
}
#: matched sizes: OverLoCK vs the baselines compared with it in the papers' tables.
SIZE_GROUPS = {
    't': ['OverLoCK-T', 'MogaNet-S', 'UniRepLKNet-T'],
    's': ['OverLoCK-S', 'MogaNet-B', 'UniRepLKNet-S'],
    'all': ['OverLoCK-T', 'MogaNet-S', 'UniRepLKNet-T', 'OverLoCK-S', 'MogaNet-B',
            'UniRepLKNet-S', 'OverLoCK-B'],
}
CONFIG_NAMES = {'OverLoCK-T': 'overlock-t', 'OverLoCK-S': 'overlock-s', 'OverLoCK-B': 'overlock-b',
                'MogaNet-S': 'moganet-s', 'MogaNet-B': 'moganet-b',
                'UniRepLKNet-T': 'unireplknet-t', 'UniRepLKNet-S': 'unireplknet-s'}
#: the published FLOPs protocol: input (H, W) of the mmdet/mmseg 2.x ``get_flops`` tools.
FLOPS_SHAPE = {'det': (1280, 800), 'seg': (2048, 512)}
COLORS = {'OverLoCK': '#d62728', 'MogaNet': '#1f77b4', 'UniRepLKNet': '#2ca02c'}


def config_path(task: str, name: str) -> Path:
    return ROOT / (DET_CFG if task == 'det' else SEG_CFG).format(CONFIG_NAMES[name])


# --------------------------------------------------------------------------- model building
def build_model(task: str, name: str, meta: bool = False, shape=None,
                for_flops: bool = False) -> nn.Module:
    """Build the detector / segmentor of ``name`` from its config, without pretrained weights and
    with SyncBN reverted to BN (single process). ``meta``: on the meta device; ``for_flops``:
    OverLoCK's ContMix takes its unfold/einsum path, whose k*k multiply-adds per output the FLOP
    counters see (a fused kernel would be an opaque op to them)."""
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(str(config_path(task, name)))
    cfg.model.backbone.pop('init_cfg', None)  # no downloads: architecture only
    if (meta or for_flops) and cfg.model.backbone.type == 'OverLoCK':
        cfg.model.backbone.contmix_impl = 'reference'
    if task == 'seg' and shape is not None:
        cfg.model.data_preprocessor.size = tuple(shape)
    init_default_scope('mmdet' if task == 'det' else 'mmseg')
    if task == 'det':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    if meta:
        with torch.device('meta'):
            model = MODELS.build(cfg.model)
    else:
        model = MODELS.build(cfg.model)
        model.init_weights()
    return revert_sync_batchnorm(model)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class DetFlopsProxy(nn.Module):
    """What mmdet 2.x's ``get_flops`` (``forward_dummy``) runs for a cascade detector: backbone,
    neck, RPN head, then every stage's box head on 1000 RoIs and mask head on the first 100.
    RoIAlign is not counted there (no counter hook), so its outputs are given directly."""

    def __init__(self, detector: nn.Module, num_rois: int = 1000, num_mask_rois: int = 100):
        super().__init__()
        self.det = detector
        self.num_rois, self.num_mask_rois = num_rois, num_mask_rois

    def forward(self, img: torch.Tensor):
        det = self.det
        x = det.extract_feat(img)
        outs = [det.rpn_head(x)]
        roi_head = det.roi_head
        for i in range(roi_head.num_stages):
            extractor = roi_head.bbox_roi_extractor[i]
            size = extractor.roi_layers[0].output_size
            feats = x[0].new_zeros(self.num_rois, extractor.out_channels, *size)
            outs.append(roi_head.bbox_head[i](feats))
        for i in range(roi_head.num_stages):
            extractor = roi_head.mask_roi_extractor[i]
            size = extractor.roi_layers[0].output_size
            feats = x[0].new_zeros(self.num_mask_rois, extractor.out_channels, *size)
            outs.append(roi_head.mask_head[i](feats))
        return outs


class SegFlopsProxy(nn.Module):
    """What mmseg 0.x's ``get_flops`` (``forward_dummy``) runs: backbone and decode head (the
    auxiliary head and the final resize are not counted)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.seg = segmentor

    def forward(self, img: torch.Tensor):
        return self.seg.decode_head(self.seg.extract_feat(img))


def flops_proxy(task: str, model: nn.Module) -> nn.Module:
    return DetFlopsProxy(model) if task == 'det' else SegFlopsProxy(model)


def _norm_flops(affine: bool, training: bool = True):
    # fvcore/mmengine handles: train-mode norms 4 (5 with affine) per element, eval-mode BN 1 (2).
    return (5 if affine else 4) if training else (2 if affine else 1)


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape else 1


def _meta_flop_formulas() -> dict:
    """``FlopCounterMode`` formulas for the ops mmengine's ``FlopAnalyzer`` counts besides
    conv/linear/matmul/einsum (which FlopCounterMode already counts), in FlopCounterMode's unit
    (2 per multiply-add), so both counters give the same totals."""
    aten = torch.ops.aten

    def batch_norm(x, w, b, rm, rv, training, *args, out_shape=None, **kw):
        return 2 * _numel(x) * _norm_flops(w is not None, bool(training))

    def layer_norm(x, normalized_shape, w, b, *args, out_shape=None, **kw):
        return 2 * _numel(x) * _norm_flops(w is not None)

    def group_norm(x, w, b, *args, out_shape=None, **kw):
        return 2 * _numel(x) * _norm_flops(w is not None)

    def upsample(factor):
        def count(*args, out_shape=None, **kw):
            return 2 * factor * _numel(out_shape)
        return count

    def adaptive_pool(x, *args, out_shape=None, **kw):
        return 2 * _numel(x)

    def spatial_mean(x, dim=None, *args, out_shape=None, **kw):
        # F.adaptive_avg_pool2d(x, 1) reaches the dispatcher as mean over (H, W).
        dims = sorted(d % len(x) for d in dim) if dim is not None and len(x) == 4 else []
        return 2 * _numel(x) if dims == [2, 3] else 0

    return {aten.native_batch_norm: batch_norm,
            aten._native_batch_norm_legit_no_training: lambda x, w, b, rm, rv, *a, **k:
                batch_norm(x, w, b, rm, rv, False),
            aten.native_layer_norm: layer_norm, aten.native_group_norm: group_norm,
            aten.upsample_nearest2d: upsample(1), aten.upsample_bilinear2d: upsample(4),
            aten._adaptive_avg_pool2d: adaptive_pool, aten.mean.dim: spatial_mean}


@contextlib.contextmanager
def _autocast_query_accepts_meta():
    """``torch.is_autocast_enabled('meta')`` raises; code that asks it (OverLoCK's ContMix
    reference path) gets ``False`` -- autocast is indeed off for meta tensors."""
    original = torch.is_autocast_enabled

    def query(*args, **kwargs):
        if args and args[0] == 'meta':
            return False
        return original(*args, **kwargs)

    torch.is_autocast_enabled = query
    try:
        yield
    finally:
        torch.is_autocast_enabled = original


def count_flops(task: str, model: nn.Module, shape=None, counter: str = 'meta') -> float:
    """GFLOPs of ``model`` with the published protocol (:func:`flops_proxy`) at ``shape``
    (default 1280x800 / 2048x512), counted as multiply-adds like the published tables.

    Args:
        task: ``'det'`` or ``'seg'``.
        model: the detector / segmentor; on the meta device for ``counter='meta'``.
        shape: input (H, W).
        counter: ``'meta'``: ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors (no
            compute; conv/linear/matmul/einsum plus :func:`_meta_flop_formulas`, the op set and
            formulas of mmengine's analyser); ``'mmengine'``: ``mmengine.analysis.FlopAnalyzer``
            on a real CPU trace (the whole network actually runs: minutes at these sizes).
    """
    h, w = shape or FLOPS_SHAPE[task]
    proxy = flops_proxy(task, model).eval()
    if counter == 'meta':
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False, custom_mapping=_meta_flop_formulas()) as fc, \
                _autocast_query_accepts_meta():
            proxy(torch.empty(1, 3, h, w, device='meta'))
        return fc.get_total_flops() / 2e9
    if counter != 'mmengine':
        raise ValueError(f"unknown FLOP counter '{counter}'; valid: meta, mmengine.")
    from mmengine.analysis import FlopAnalyzer
    device = next(model.parameters()).device
    with torch.no_grad():
        analyzer = FlopAnalyzer(proxy, (torch.zeros(1, 3, h, w, device=device),))
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        return analyzer.total() / 1e9


# ------------------------------------------------------------------------- synthetic batches
def det_batch(model: nn.Module, n: int, h: int, w: int, training: bool):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    gen = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w),
                                        scale_factor=(1., 1.)))
        k = 4
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([w * 0.6, h * 0.6])
        wh = (torch.rand(k, 2, generator=gen) * 0.3 + 0.1) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], dim=1)
        masks = np.zeros((k, h, w), dtype=np.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        labels = torch.randint(0, 80, (k,), generator=gen)
        s.gt_instances = InstanceData(bboxes=boxes, labels=labels, masks=BitmapMasks(masks, h, w))
        samples.append(s)
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training)


def seg_batch(model: nn.Module, n: int, h: int, w: int, training: bool):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    gen = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, 150, (1, h, w), generator=gen))
        samples.append(s)
    return model.data_preprocessor(dict(inputs=inputs, data_samples=samples), training)


# ------------------------------------------------------------------------------ measurement
def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``/proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    """Peak memory of a phase on the current device, relative to ``base`` (CPU)."""

    def __init__(self, device: torch.device, base: int) -> None:
        self.device, self.base = device, base

    def start(self) -> None:
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()

    def peak_mb(self) -> float:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return max(_peak_rss_bytes() - self.base, 0) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _move(data, device):
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, dict):
        return {k: _move(v, device) for k, v in data.items()}
    if isinstance(data, list):
        return [_move(v, device) for v in data]
    return data.to(device) if hasattr(data, 'to') else data


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / max(iters, 1)


def measure(task: str, name: str, args) -> Dict:
    """All numbers of one model (run in a child process on CPU)."""
    device = torch.device(args.device)
    if device.type == 'cpu' and args.threads:
        torch.set_num_threads(args.threads)
    res: Dict = dict(name=name, config=str(config_path(task, name).relative_to(ROOT)))
    t0 = time.perf_counter()
    meta = build_model(task, name, meta=True)
    res['params_m'] = count_params(meta) / 1e6
    res['backbone_params_m'] = count_params(meta.backbone) / 1e6
    aux = getattr(meta, 'auxiliary_head', None)
    res['aux_params_m'] = count_params(aux) / 1e6 if aux is not None else 0.
    if not args.skip_flops and args.flops_counter == 'meta':
        res['flops_g'] = count_flops(task, meta)
    del meta
    if not args.skip_flops and args.flops_counter == 'mmengine':
        res['flops_g'] = count_flops(task, build_model(task, name, for_flops=True),
                                     counter='mmengine')
    res['flops_time_s'] = time.perf_counter() - t0
    if args.skip_infer and args.skip_train:
        return res

    base = _rss_bytes()
    h, w = args.shape
    model = build_model(task, name, shape=(h, w)).to(device)
    make = det_batch if task == 'det' else seg_batch
    meter = Meter(device, base)
    if not args.skip_train:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        data = _move(make(model, args.batch, h, w, True), device)

        def train_step():
            losses = model(**data, mode='loss')
            loss, _ = model.parse_losses(losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        meter.start()
        sec = timed(train_step, args.warmup, args.iters, device)
        res['train_img_s'] = args.batch / sec
        res['train_mem_mb'] = meter.peak_mb()
        del opt, data
        model.zero_grad(set_to_none=True)
    if not args.skip_infer:
        model.eval()
        if not args.no_reparam and hasattr(model.backbone, 'switch_to_deploy'):
            model.backbone.switch_to_deploy()
            res['reparam'] = True
        data = _move(make(model, args.batch, h, w, False), device)

        def infer():
            with torch.no_grad():
                model(**data, mode='predict')

        meter.start()
        sec = timed(infer, args.warmup, args.iters, device)
        res['infer_img_s'] = args.batch / sec
        res['infer_mem_mb'] = meter.peak_mb()
    res['time_s'] = time.perf_counter() - t0
    return res


def _child(task, name, args, conn) -> None:
    try:
        conn.send(measure(task, name, args))
    except BaseException:  # report, never hang the parent
        conn.send(dict(name=name, error=traceback.format_exc()))
    finally:
        conn.close()


def run_isolated(task: str, name: str, args) -> Dict:
    """CPU: one forked child per model (separate peak-RSS marks; the parent never computes, so
    the fork is safe). CUDA: in-process, CUDA's own peak counters isolate the phases."""
    if args.device.startswith('cuda') or args.no_fork:
        try:
            return measure(task, name, args)
        except Exception:
            return dict(name=name, error=traceback.format_exc())
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    ctx = mp.get_context('fork')
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(task, name, args, send))
    proc.start()
    send.close()
    try:
        res = recv.recv()
    except EOFError:
        res = dict(name=name, error=f'measurement process died (exit code {proc.exitcode}; '
                                    'out of memory?)')
    proc.join()
    return res


# ---------------------------------------------------------------------------------- report
def family(name: str) -> str:
    return name.split('-')[0]


def _fmt(v, spec='.1f', missing='—'):
    return missing if v is None else format(v, spec)


def _delta(ours, pub):
    return None if ours is None or not pub else 100. * (ours / pub - 1.)


def write_report(task: str, size: str, results: List[Dict], args, out_dir: Path) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f'compare_{task}_{size}'
    h, w = args.shape
    fh, fw = FLOPS_SHAPE[task]
    acc_name = 'AP box / mask' if task == 'det' else 'mIoU (ss)'
    dev = args.device
    if dev.startswith('cuda') and torch.cuda.is_available():
        dev_desc = torch.cuda.get_device_name(torch.device(dev))
    else:
        dev_desc = f'CPU ({platform.processor() or platform.machine()}, ' \
                   f'{args.threads or torch.get_num_threads()} threads)'
    title = {'det': 'Cascade Mask R-CNN + FPN, 4conv1fc GIoU heads, MS 3x (COCO)',
             'seg': 'UperNet 160k (ADE20K)'}[task]
    lines = [f'# OverLoCK vs MogaNet vs UniRepLKNet: {title}', '',
             f'Device: {dev_desc}; torch {torch.__version__}. Throughput/memory at batch '
             f'{args.batch}, {h}x{w} input, {args.warmup} warm-up + {args.iters} timed '
             f'iterations; FLOPs at {fh}x{fw} with the published protocol.', '',
             f'| Model | Backbone params (M) | Params (M) | Published params (M) | '
             f'FLOPs (G) @{fh}x{fw} | Published FLOPs (G) | Inference (img/s) | '
             f'Training (img/s) | Peak mem infer / train (MB) | Published {acc_name} |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        pub = PUBLISHED[task].get(r['name'], {})
        if 'error' in r:
            lines.append(f"| {r['name']} | failed: {r['error'].strip().splitlines()[-1]} "
                         '| | | | | | | | |')
            continue
        dp, df = _delta(r.get('params_m'), pub.get('params')), _delta(r.get('flops_g'),
                                                                      pub.get('flops'))
        acc = pub.get('acc')
        acc_s = ' / '.join(_fmt(a) for a in acc) if acc else '—'
        if pub.get('note'):
            acc_s += f" ({pub['note']})"
        lines.append(
            f"| {r['name']} | {_fmt(r.get('backbone_params_m'), '.2f')} | "
            f"{_fmt(r.get('params_m'), '.2f')} | {_fmt(pub.get('params'))}"
            f"{'' if dp is None else f' ({dp:+.1f}%)'} | {_fmt(r.get('flops_g'))} | "
            f"{_fmt(pub.get('flops'))}{'' if df is None else f' ({df:+.1f}%)'} | "
            f"{_fmt(r.get('infer_img_s'), '.2f')} | {_fmt(r.get('train_img_s'), '.2f')} | "
            f"{_fmt(r.get('infer_mem_mb'), '.0f')} / {_fmt(r.get('train_mem_mb'), '.0f')} | "
            f'{acc_s} |')
    flops_note = (
        'backbone + FPN + RPN head + each cascade stage\'s 4conv1fc box head on 1000 RoIs and '
        'mask head on 100 RoIs (mmdet 2.x `get_flops`/`forward_dummy`; RoIAlign not counted)'
        if task == 'det' else
        'backbone + UperNet decode head (mmseg 0.x `get_flops`/`forward_dummy`; auxiliary head '
        'and final resize not counted)')
    mem_note = ('`torch.cuda.max_memory_allocated`' if dev.startswith('cuda') else
                'growth of the peak resident set size (VmHWM) over the process before the model '
                'was built, one forked process per model')
    counter_note = ('`torch.utils.flop_counter.FlopCounterMode` on the meta device with the '
                    'formulas of mmengine\'s `FlopAnalyzer` for norms, pooling and upsampling'
                    if args.flops_counter == 'meta' else
                    '`mmengine.analysis.FlopAnalyzer` on a real trace')
    lines += ['', '## Notes', '',
              f'* FLOPs: multiply-accumulates counted by {counter_note}, of {flops_note}; '
              f'input 1x3x{fh}x{fw}.',
              '* Params: every parameter of the training-form model, auxiliary head included '
              '(seg auxiliary heads: '
              + ', '.join(f"{r['name']} {r.get('aux_params_m', 0):.2f}M" for r in results
                          if 'error' not in r and r.get('aux_params_m')) + ').'
              if task == 'seg' else
              '* Params: every parameter of the training-form model.',
              '* Published figures: docs/spec/RESULTS.md (authors\' papers); Δ in brackets = '
              'ours vs published.',
              '* Inference: `predict` mode' + ('' if args.no_reparam else
                                               ', re-parameterised backbones (`switch_to_deploy`) '
                                               'where available') + '; '
              'training: loss + backward + AdamW step, training-form backbone; random weights and '
              'synthetic images/labels.',
              f'* Peak memory: {mem_note}; includes weights (and optimizer state in training).',
              '* All models share the detector/segmentor, data pipeline and schedule '
              '(configs/mmdet/_base_, configs/mmseg/_base_); each backbone keeps its authors\' '
              'optimiser recipe.']
    md = out_dir / f'{stem}.md'
    png = out_dir / f'{stem}.png'
    js = out_dir / f'{stem}.json'
    plotted = plot(task, results, png, (h, w), dev_desc)
    if plotted:
        lines += ['', f'![accuracy vs FLOPs and throughput]({png.name})']
    md.write_text('\n'.join(lines) + '\n')
    js.write_text(json.dumps(dict(task=task, size=size, device=dev_desc, shape=[h, w],
                                  batch=args.batch, iters=args.iters, warmup=args.warmup,
                                  flops_shape=[fh, fw], results=results,
                                  published=PUBLISHED[task]), indent=2))
    return dict(md=md, png=png if plotted else None, json=js)


def plot(task: str, results: List[Dict], path: Path, shape, dev_desc: str) -> bool:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    acc_label = 'COCO box AP (published)' if task == 'det' else 'ADE20K mIoU (published)'
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    missing = []
    for r in results:
        acc = PUBLISHED[task].get(r['name'], {}).get('acc')
        if 'error' in r or not acc:
            missing.append(r['name'])
            continue
        c = COLORS[family(r['name'])]
        for ax, key in zip(axes, ('flops_g', 'infer_img_s')):
            if r.get(key) is None:
                continue
            ax.scatter(r[key], acc[0], s=90, color=c, zorder=3,
                       marker='*' if family(r['name']) == 'OverLoCK' else 'o')
            ax.annotate(r['name'], (r[key], acc[0]), textcoords='offset points', xytext=(6, 5),
                        fontsize=9)
    fh, fw = FLOPS_SHAPE[task]
    axes[0].set_xlabel(f'GFLOPs @ {fh}x{fw} (measured, published protocol)')
    axes[1].set_xlabel(f'inference throughput, img/s @ {shape[0]}x{shape[1]} ({dev_desc})')
    for ax in axes:
        ax.set_ylabel(acc_label)
        ax.grid(alpha=0.3)
    for fam, c in COLORS.items():
        axes[0].scatter([], [], color=c, label=fam, marker='*' if fam == 'OverLoCK' else 'o')
    axes[0].legend(loc='lower right')
    sub = f' (no published accuracy: {", ".join(missing)})' if missing else ''
    fig.suptitle({'det': 'Cascade Mask R-CNN MS 3x', 'seg': 'UperNet 160k'}[task] + sub,
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', choices=('det', 'seg'), default='det',
                   help='det: Cascade Mask R-CNN MS 3x; seg: UperNet 160k (default: det)')
    p.add_argument('--size', choices=sorted(SIZE_GROUPS), default='s',
                   help='matched-size group: t = OverLoCK-T / MogaNet-S / UniRepLKNet-T, '
                        's = OverLoCK-S / MogaNet-B / UniRepLKNet-S (default), all = every model')
    p.add_argument('--models', nargs='+', choices=sorted(CONFIG_NAMES),
                   help='explicit model list (overrides --size)')
    p.add_argument('--shape', type=int, nargs=2, default=None, metavar=('H', 'W'),
                   help='throughput input size, multiples of 32 (default: 320 320 on CPU, '
                        '800 1280 (det) / 512 512 (seg) on CUDA)')
    p.add_argument('--batch', type=int, default=None,
                   help='images per iteration (default 1 for det, 2 for seg: UperNet\'s pooling '
                        'module has 1x1 maps, and BatchNorm needs 2 values per channel to train)')
    p.add_argument('--iters', type=int, default=None,
                   help='timed iterations (default 2 on CPU, 20 on CUDA)')
    p.add_argument('--warmup', type=int, default=1, help='untimed iterations first (default 1)')
    p.add_argument('--device', default=None, help="'cpu', 'cuda', 'cuda:1' (default: cuda if "
                                                  'available)')
    p.add_argument('--threads', type=int, default=0, help='CPU threads (default: torch default)')
    p.add_argument('--skip-flops', action='store_true', help='do not count FLOPs')
    p.add_argument('--flops-counter', choices=('meta', 'mmengine'), default='meta',
                   help="meta: FlopCounterMode on the meta device, no compute (default); "
                        "mmengine: mmengine's FlopAnalyzer on a real CPU trace (slow)")
    p.add_argument('--skip-infer', action='store_true', help='do not time inference')
    p.add_argument('--skip-train', action='store_true', help='do not time training')
    p.add_argument('--no-reparam', action='store_true',
                   help='time inference with the training-form backbones')
    p.add_argument('--no-fork', action='store_true',
                   help='CPU: measure in-process (peak memory is then cumulative)')
    p.add_argument('--out-dir', default='work_dirs/compare', help='output folder')
    args = p.parse_args(argv)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    cuda = args.device.startswith('cuda')
    if cuda and not torch.cuda.is_available():
        p.error('--device cuda but no GPU is available')
    if args.shape is None:
        args.shape = ((800, 1280) if args.task == 'det' else (512, 512)) if cuda else (320, 320)
    if any(s <= 0 or s % 32 for s in args.shape):
        p.error(f'--shape {args.shape}: both sides must be positive multiples of 32')
    if args.iters is None:
        args.iters = 20 if cuda else 2
    if args.batch is None:
        args.batch = 2 if args.task == 'seg' else 1
    if args.task == 'seg' and args.batch < 2 and not args.skip_train:
        p.error('--task seg trains with --batch >= 2 (UperNet pooling-module BatchNorm on 1x1 '
                'maps); use --batch 2 or --skip-train')
    if args.batch < 1 or args.iters < 1 or args.warmup < 0:
        p.error('--batch and --iters must be >= 1, --warmup >= 0')
    return args


def main(argv=None) -> Dict[str, Path]:
    args = parse_args(argv)
    names = args.models or SIZE_GROUPS[args.size]
    size = 'custom' if args.models else args.size
    import mmdet.models  # noqa: F401  (registries, before any fork)
    import mmseg.models  # noqa: F401
    import overlock_mm  # noqa: F401
    results = []
    for name in names:
        t = time.perf_counter()
        print(f'[compare] {name}: measuring ...', flush=True)
        r = run_isolated(args.task, name, args)
        if 'error' in r:
            print(f'[compare] {name}: FAILED\n{r["error"]}', flush=True)
        else:
            print(f"[compare] {name}: params {r['params_m']:.2f}M, FLOPs "
                  f"{_fmt(r.get('flops_g'))}G, infer {_fmt(r.get('infer_img_s'), '.2f')} img/s, "
                  f"train {_fmt(r.get('train_img_s'), '.2f')} img/s "
                  f'({time.perf_counter() - t:.0f}s)', flush=True)
        results.append(r)
    out = write_report(args.task, size, results, args, Path(args.out_dir))
    print(f"[compare] wrote {', '.join(str(p) for p in out.values() if p)}")
    print(out['md'].read_text())
    return out


if __name__ == '__main__':
    main()
