"""flux's Hydra config tree. conf/ stays at the top of the repository and ships inside the wheel as the package
flux.conf, so every entry point and every compose call finds it (as pkg://flux.conf) from any working directory, in a
checkout or an installed flux alike. Only the two names below are Python; Hydra reads the YAML files."""

CONFIG_MODULE = __name__
CONFIG_PATH = f"pkg://{__name__}"
