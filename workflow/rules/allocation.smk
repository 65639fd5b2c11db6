rule allocate:
    """Per-layer sparsity ratios (uniform, ECoFLaP or OWL) and a plot of them."""
    input:
        unpack(allocation_inputs),
    output:
        allocation="results/{model}/{method}/{sparsity}/allocation.json",
        plot=report("results/{model}/{method}/{sparsity}/allocation.png", category="{model}", subcategory="allocation",
                    caption="../report/allocation.rst",
                    labels={"method": "{method}", "sparsity": "{sparsity}"}),
    params:
        py=model_python,
        explain=explain_python,
        args=allocation_args,
    # one core: a two-core reservation would wait for both cores to free up, leaving one idle
    # for the length of a single-threaded job (common.smk)
    threads: 1
    priority: 1  # before evaluations: they then run in pairs of single-threaded jobs (common.smk)
    log:
        "results/{model}/{method}/{sparsity}/logs/allocate.log",
    benchmark:
        "results/{model}/{method}/{sparsity}/benchmarks/allocate.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap allocate --layout {input.layout} {params.args} "
        "--out {output.allocation} --plot {output.plot} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"
