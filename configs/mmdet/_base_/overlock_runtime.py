# Shared by every OverLoCK detection config: load overlock_mm, AdamW, SyncBN under DDP.
custom_imports = dict(imports=['overlock_mm'], allow_failed_imports=False)
# mmengine's Runner plus a check of the dataset paths before the loops build them, for every
# entry point (tools/train.py, mim train, the libraries' scripts); data_check = False skips it
runner_type = 'DataCheckRunner'

# Leaf configs point the backbone's init_cfg at the authors' ImageNet-1K weights (GitHub
# LMMMEng/OverLoCK, release v1). Loading them into the detection layout leaves `head`/`aux_head`
# unused and initialises `extra_norm` / `h_proj` (the dense-only modules); overlock_mm logs both.

# BatchNorm everywhere (backbone included) becomes SyncBatchNorm under distributed training;
# single-process runs keep plain BatchNorm (mmengine also reverts SyncBN there).
sync_bn = 'torch'

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    # No weight decay on norms, biases, layer scales, GRN and relative position biases.
    paramwise_cfg=dict(norm_decay_mult=0., bias_decay_mult=0., flat_decay_mult=0.,
                       custom_keys={'.rpb1': dict(decay_mult=0.), '.rpb2': dict(decay_mult=0.)}))

# The released recipes: 8 GPUs x 2 images. `--auto-scale-lr` rescales lr for other batch sizes.
auto_scale_lr = dict(enable=False, base_batch_size=16)
