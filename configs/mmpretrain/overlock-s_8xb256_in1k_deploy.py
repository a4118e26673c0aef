# OverLoCK-S, ImageNet-1K, re-parameterised (deploy) form: every DilatedReparamBlock is one
# large-kernel depthwise conv with bias. Same function as the training form, fewer parameters.
# Target (authors' release): 84.8 top-1.
# Released weights: https://github.com/LMMMEng/OverLoCK/releases/download/v1/overlock_s_in1k_224_reparam.pth
# Also loads training-form checkpoints (overlock_s_in1k_224.pth, ours): they are fused on load.
# Make a deploy checkpoint from any trained one with tools/reparameterize.py.
_base_ = './overlock-s_8xb256_in1k.py'
model = dict(backbone=dict(deploy=True))
