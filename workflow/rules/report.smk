rule aggregate:
    """One table (CSV + Markdown) over methods x sparsities with every metric and the
    wall time and peak memory of each stage, a plot per metric, and sparsity profiles."""
    input:
        evals=lambda wc: expand("results/{model}/{row}/eval/{task}.json", model=wc.model, row=rows(),
                                task=evals_of(wc.model)),
        layout="results/{model}/layout.json",
    output:
        csv="results/{model}/summary/summary.csv",
        md="results/{model}/summary/summary.md",
        metrics=report("results/{model}/summary/metrics.png", category="summary"),
        profiles=report("results/{model}/summary/profiles.png", category="summary"),
    params:
        py=PY,
        rows=lambda wc: " ".join(rows()),
        reference=lambda wc: f"--reference {config['reference']} --model-name {wc.model}" if config.get("reference") else "",
    log:
        "results/{model}/logs/aggregate.log",
    benchmark:
        "results/{model}/benchmarks/aggregate.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap aggregate --results results/{wildcards.model} --rows {params.rows} "
        "--out-dir results/{wildcards.model}/summary {params.reference} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"
