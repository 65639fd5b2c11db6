def allocation_inputs(wc):
    inputs = {"layout": f"results/{wc.model}/layout.json"}
    if method(wc)["allocation"] != "uniform":
        inputs["scores"] = f"results/{wc.model}/scores/{method(wc)['scorer']}.json"
    return inputs


def allocation_args(wc, input):
    m = method(wc)
    target, _nm = parse_label(wc.sparsity)
    args = [f"--kind {m['allocation']}", f"--target {target}"]
    if m["allocation"] != "uniform":
        args.append(f"--scores {input.scores}")
    if m["allocation"] == "ecoflap":
        args += [f"--max-sparsity-offset {m['max_sparsity_offset']}", f"--aggregation {m['aggregation']}"]
    if m["allocation"] == "owl":
        args.append(f"--owl-lambda {m['lambda']}")
    return " ".join(args)


rule allocate:
    """Per-layer sparsity ratios (uniform, ECoFLaP or OWL) and a plot of them."""
    input:
        unpack(allocation_inputs),
    output:
        allocation="results/{model}/{method}/{sparsity}/allocation.json",
        plot=report("results/{model}/{method}/{sparsity}/allocation.png", category="allocation"),
    params:
        args=allocation_args,
    log:
        "results/{model}/{method}/{sparsity}/logs/allocate.log",
    benchmark:
        "results/{model}/{method}/{sparsity}/benchmarks/allocate.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{PY} -m ecoflap allocate --layout {input.layout} {params.args} "
        "--out {output.allocation} --plot {output.plot} > {log} 2>&1"
