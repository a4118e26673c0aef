"""OverLoCKClsHead: the backbone outputs it reads are checked, with the fix in the message."""
import pytest
import torch

from overlock_mm.heads import OverLoCKClsHead


def test_aux_head_with_one_backbone_output_names_out_indices():
    # OverLoCK's default out_indices=(3,) returns only the main map; the aux head's default
    # index -1 then points at that same map, so an index check alone cannot see the mistake
    head = OverLoCKClsHead(num_classes=5, in_channels=40, aux_in_channels=32)
    feats = (torch.randn(2, 40, 7, 7),)
    assert head(feats).shape == (2, 5)  # the main head alone is fine
    with pytest.raises(ValueError, match=r'aux head expects \[N, 32, H, W\].*out_indices=\(3, 4\)'):
        head.aux_forward(feats)


def test_both_outputs_read_and_wrong_channels_named():
    head = OverLoCKClsHead(num_classes=5, in_channels=40, aux_in_channels=32)
    feats = (torch.randn(2, 40, 7, 7), torch.randn(2, 32, 7, 7))
    assert head(feats).shape == head.aux_forward(feats).shape == (2, 5)
    with pytest.raises(ValueError, match=r'main head expects \[N, 40, H, W\].*got \[2, 48, 7, 7\]'):
        head((torch.randn(2, 48, 7, 7), feats[1]))
    with pytest.raises(ValueError, match='reads backbone output 3 but the backbone returned 2'):
        OverLoCKClsHead(num_classes=5, in_channels=40, in_index=3)(feats)
