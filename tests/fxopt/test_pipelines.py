"""Pipelines: the phases put each feature's pass at its place, per target and options."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.errors import PipelineError
from fxopt.infra.registry import PassGroup
from fxopt.pipelines import PIPELINES, build_pipeline, expand_pipeline


def test_default_cpu_and_cuda():
    assert build_pipeline("default", target="cpu") == [
        "cleanup", "fuse_attention", "fold_bn", "merge_convs", "fuse_act", "lower_convs",
        "to_channels_last", "cleanup"]
    assert build_pipeline("default", target="cuda") == [
        "cleanup", "fuse_attention", "fold_bn", "merge_convs", "fuse_act", "cleanup",
        "fuse_add_layer_norm", "lower_to_triton"]


def test_every_feature_at_its_place():
    # pruning after fuse_attention: its SDPA rule sees hand-written attention as one call
    assert build_pipeline("default", target="cpu", prune=True, quantize=True) == [
        "cleanup", "fuse_attention", "prune_channels", "fold_bn", "merge_convs", "fuse_act",
        "lower_convs", "to_channels_last", "quantize_int8", "cleanup", "lower_int8_cpu"]
    assert build_pipeline("default", target="cuda", quantize=True)[-4:] == [
        "quantize_int8", "cleanup", "fuse_add_layer_norm", "lower_to_triton"]


def test_user_lists_and_named_passes():
    # a user's own list gets the phases too; a feature pass named in passes= moves to its place
    assert build_pipeline(["cleanup"], target="cpu", passes=["prune_channels", "dce"]) == [
        "cleanup", "prune_channels", "dce"]
    assert build_pipeline(["fuse_act"], target="cpu") == [
        "fuse_act", "lower_convs", "to_channels_last"]
    assert build_pipeline("cleanup", target="cpu", passes=["lower_to_triton"]) == [
        "cleanup", "lower_to_triton"]
    # the add + LayerNorm fusion: by default on CUDA only; named, before the Triton lowering
    assert build_pipeline("cleanup", target="cpu",
                          passes=["lower_to_triton", "fuse_add_layer_norm"]) == [
        "cleanup", "fuse_add_layer_norm", "lower_to_triton"]
    assert build_pipeline("cleanup", target="cpu", passes=["fuse_add_layer_norm"]) == [
        "cleanup", "fuse_add_layer_norm"]


def test_disabled_fuse_act_takes_the_layout_passes_with_it():
    names = build_pipeline("default", target="cpu", disable=["fuse_act"])
    assert "lower_convs" not in names and "to_channels_last" not in names


def test_expand_resolves_groups_and_checks_order():
    steps = expand_pipeline(PIPELINES["default"], disable=["cse"])
    assert isinstance(steps[0], PassGroup) and "cse" not in steps[0].members
    with pytest.raises(PipelineError, match="must run after 'fold_bn'"):
        expand_pipeline(["fuse_act", "fold_bn"])
    with pytest.raises(PipelineError, match="unknown pipeline"):
        build_pipeline("fastest")


def test_optimize_runs_what_build_pipeline_says():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    opt = fxopt.optimize(m, torch.randn(1, 3, 8, 8))
    assert opt.report.pipeline == build_pipeline("default", target="cpu")
