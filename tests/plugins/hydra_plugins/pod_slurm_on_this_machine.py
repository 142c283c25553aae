"""A Hydra launcher for tests only (tests/test_launchers.py puts tests/plugins on the PYTHONPATH of the
multirun it starts; Hydra takes launchers from the hydra_plugins namespace alone): the `slurm` launcher
config (conf/hydra/launcher/slurm.yaml) run by submitit's local executor."""
from omegaconf import OmegaConf

from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher


class SlurmConfigOnThisMachine(LocalLauncher):
    """The parameters of the `slurm` config the local executor takes (time limit, GPUs and tasks a job,
    requeues at the time limit); the cluster's own (partition, array parallelism, signal delay) left out."""

    def __init__(self, **params):
        known = set(OmegaConf.structured(BaseQueueConf).keys()) | {"max_num_timeout", "setup"}
        super().__init__(**{k: v for k, v in params.items() if k in known})
