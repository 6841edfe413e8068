"""Configs: common knobs plus each algorithm's typed config, one name per knob; the flat-dict
round trip; the presets; the deprecated flat keywords of 0.1 and the errors naming valid keys."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from _fed import blobs_task
from fedng.federated.algorithms import REGISTRY
from fedng.federated.config import (
    ALGORITHMS,
    CONFIG_TYPES,
    ClientConfig,
    FedAvgConfig,
    FedFisherConfig,
    FedNGConfig,
    FedOptConfig,
    FedProxConfig,
    ServerConfig,
    make_configs,
    setting_names,
)
from fedng.federated.config.common import COMMON_KEYS


def test_every_name_has_an_implementation_and_a_config() -> None:
    assert set(REGISTRY) == set(ALGORITHMS) == set(CONFIG_TYPES)


def test_one_name_per_knob() -> None:
    """No algorithm's knob shadows a common one, so the flat dict is unambiguous."""
    for name, kind in CONFIG_TYPES.items():
        assert not set(kind.field_names()) & COMMON_KEYS, name


def test_presets_are_the_algorithm_defaults() -> None:
    cc, sc = make_configs("fedng")
    assert cc.options is sc.options
    assert cc.options == FedNGConfig(
        precond="global",
        aggregation="summable",
        fisher_center="mean",
        fisher_damping=3.0,
        damping=0.1,
        damping_scale="relative",
        kl_clip=1e-3,
        compression="auto",
        probe_dtype="int8",
    )
    assert cc.options_as(FedNGConfig).broadcast_mode() == "factors"
    assert make_configs("fedprox")[0].options == FedProxConfig(prox_mu=0.1)
    assert make_configs("fedfisher")[0].options == FedFisherConfig(curvature="diag")
    assert make_configs("fedfisher")[0].options_as(FedFisherConfig).local_epochs == 5.0
    assert make_configs("fedadam")[1].server_lr == 0.03
    assert make_configs("fedadagrad")[1].server_lr == 0.1
    fedavgm = make_configs("fedavgm")
    assert fedavgm[1].server_momentum == 0.9
    assert fedavgm[0].options == FedAvgConfig() == make_configs("fedavg")[0].options


@pytest.mark.parametrize(
    "precond,mode", [("global", "factors"), ("global_local", "factors"), ("local", "none")]
)
def test_broadcast_follows_the_preconditioner(precond: str, mode: str) -> None:
    opts = make_configs("fedng", {"precond": precond})[1].options_as(FedNGConfig)
    assert opts.broadcast_mode() == mode
    assert opts.replace(broadcast="inverse").broadcast_mode() == "inverse"


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_flat_dict_round_trip(algo: str) -> None:
    cc, sc = make_configs(algo, {"lr": 0.2, "num_clients": 7})
    for cfg in (cc, sc):
        flat = cfg.to_dict()
        assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
        assert type(cfg).from_dict(flat) == cfg
    assert cc.lr == 0.2 and sc.num_clients == 7


def test_make_configs_takes_flat_settings_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cc, sc = make_configs("fedng", {"curvature": "diag", "damping": 0.1, "cg_iters": 5})
        assert cc.options_as(FedNGConfig).damping == 0.1
        assert sc.options_as(FedNGConfig).cg_iters == 5
        assert make_configs("fedprox", {"prox_mu": 0.1})[0].options_as(FedProxConfig).prox_mu == 0.1
    assert "prox_mu" in setting_names("fedprox") and "prox_mu" not in setting_names("fedavg")


def test_unknown_settings_name_the_valid_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['nope'\] for fedavg.*valid keys"):
        make_configs("fedavg", {"nope": 1})
    with pytest.raises(ValueError, match="'damping' is a setting of fedng"):
        make_configs("fedavg", {"damping": 0.1})
    with pytest.raises(ValueError, match=r"unknown keys.*expected some of"):
        ServerConfig.from_dict({"server_lr": 1.0, "nope": 2})
    with pytest.raises(ValueError, match="'algorithm' must be one of"):
        make_configs("fedsgd")


def test_range_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="'lr'"):
        ClientConfig(lr=-1.0)
    with pytest.raises(ValueError, match="'precond'"):
        FedNGConfig(precond="sideways")
    with pytest.raises(ValueError, match="'curvature'"):
        FedNGConfig(curvature="kfac,fc1=dense")
    with pytest.raises(ValueError, match="'sketch_seed' must be >= 0"):
        FedNGConfig(sketch_seed=-1)
    with pytest.raises(ValueError, match="'beta2'"):
        FedOptConfig(beta2=1.0)
    with pytest.raises(ValueError, match="'options' must be a FedProxConfig"):
        ClientConfig(algorithm="fedprox", options=FedNGConfig())
    with pytest.raises(TypeError, match="not a FedNGConfig"):
        ClientConfig(algorithm="fedprox").options_as(FedNGConfig)


def test_old_flat_keywords_warn_and_work() -> None:
    with pytest.warns(DeprecationWarning, match="moved to FedProxConfig"):
        cfg = ClientConfig(algorithm="fedprox", prox_mu=0.1)
    assert cfg.options == FedProxConfig(prox_mu=0.1)
    with pytest.warns(DeprecationWarning, match="moved to FedProxConfig"):
        assert cfg.replace(prox_mu=0.0).options == FedProxConfig(prox_mu=0.0)
    with pytest.warns(DeprecationWarning, match="moved to FedNGConfig"):
        sc = ServerConfig(algorithm="fedng", aggregation="mean", damping=0.1, server_lr=0.5)
    assert sc.options == FedNGConfig(aggregation="mean", damping=0.1) and sc.server_lr == 0.5
    with pytest.raises(ValueError, match="'precond' is a setting of fedng, not of fedavg"):
        ClientConfig(precond="global")
    with pytest.raises(TypeError, match=r"unknown key 'nope'.*expected one of"):
        ServerConfig(nope=1)


def test_ce_is_a_deprecated_loss_name() -> None:
    with pytest.warns(DeprecationWarning, match="'ce' is deprecated"):
        assert ClientConfig(loss="ce").loss == "cross_entropy"
    task = blobs_task()
    with pytest.warns(DeprecationWarning, match="'ce' is deprecated"):
        assert dataclasses.replace(task, loss="ce").loss == "cross_entropy"
    with pytest.raises(ValueError, match="'loss' must be one of"):
        ClientConfig(loss="hinge")
