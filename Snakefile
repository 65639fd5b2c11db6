# ECoFLaP pruning pipeline. Rules live by stage in workflow/rules/; they are thin shells
# around the `ecoflap` CLI. Results land under results/{model}/{method}/{sparsity}/.
from snakemake.utils import min_version, validate

min_version("9.0")


report: "workflow/report/workflow.rst"  # snakemake --report report.html, after a run


# --configfile replaces the default config instead of being merged into it, so a config
# listing two methods runs two methods.
if not config:

    configfile: "config.yaml"



include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/scoring.smk"
include: "workflow/rules/allocation.smk"
include: "workflow/rules/pruning.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        expand("results/{model}/summary/summary.md", model=list(config["models"])),
        expand("results/seed_groups/{group}/summary.md", group=list(config["seed_groups"])),
    default_target: True
