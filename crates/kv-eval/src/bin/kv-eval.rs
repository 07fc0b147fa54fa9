//! `kv-eval`: perplexity, kept tokens and method comparisons on a real model and text.
//! Run `kv-eval help` for the commands; `docs/eval-cli.md` documents them and their JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kv_eval::assets::{self, LoadedModel};
use kv_eval::kept::{KeptReport, kept_positions};
use kv_eval::method::{self, MethodSpec, PipelineSpec};
use kv_eval::plot::{Plot, Series};
use kv_eval::ppl::{self, Protocol};
use kv_eval::report::{PPL_HEADER, PplReport, ppl_row, table};
use kv_eval::{EvalError, Result, fidelity, needle, speed};

const USAGE: &str = "\
kv-eval: evaluate KV-cache compression on a real model and text

USAGE:
  kv-eval ppl     [--model PATH] [--text PATH] [--start-at STR] --prefill N --score N
                  [--protocol a|windows|stream] [--windows K]
                  [--method NAME [--ratio R] [--param k=v ...] | --pipeline SPEC | --config FILE]
                  [--bos] [--tokenizer GGUF] [--json OUT]
  kv-eval kept    [--model PATH] [--text PATH] [--start-at STR] --tokens N --prefill P
                  --method NAME [--ratio R] [--param k=v ...] [--json OUT]
  kv-eval forward [--model PATH] [--text PATH] [--start-at STR] --tokens N [--json OUT]
  kv-eval compare [--model PATH] [--text PATH] [--start-at STR] [--prefill N] [--score N]
                  [--protocol a|windows|stream] [--methods default|all|SPEC,SPEC] [--json OUT]
  kv-eval fidelity [--model PATH] [--text PATH] [--start-at STR] --prefill N --score N
                  [--method ... | --pipeline ... | --config ...] [--json OUT]
  kv-eval needle  [--model PATH] [--text PATH] [--lengths 2048,4096,8192] [--depths 0.1,0.5,0.9]
                  [--seed S] [--method ... | --pipeline ... | --config ...] [--json OUT]
  kv-eval sweep   [--model PATH] [--text PATH] [--start-at STR] [--prefill N] [--score N]
                  [--protocol a|windows|stream] [--methods all|NAME,NAME] [--ratios 0.5,0.75,0.9]
                  --out DIR [--resume] [--replot]
  kv-eval speed   [--model PATH] [--text PATH] [--contexts 1024,4096] [--decode N]
                  [--method ... | --pipeline ... | --config ...] [--json OUT]
  kv-eval prefix  [--model PATH] [--text PATH] [--start-at STR] [--sequences 4] [--prefix 2048]
                  [--suffix 256] [--decode 16] [--chunk 64] [--json OUT]
  kv-eval calibrate --out FILE [--model PATH] [--text PATH] [--tokens N] [--window N]
                    [--kvquant FILE] [--rvq FILE]   (see kv-eval calibrate --help)
  kv-eval fisher  --out FILE [--sequences N] [--tokens L]   (Palu's rank search; --help)
  kv-eval methods

Defaults: --model and --text point into the asset folder ($KV_ASSETS_DIR or ./assets, filled
by `cargo xtask setup`): the SmolLM2-135M GGUF and Pride and Prejudice. Without --method,
--pipeline or --config, ppl uses the full cache. `compare` defaults to protocol A (prefill
3072, score 1024, from \"It is a truth universally\") over the full cache and one setting of
each method family (`--methods all` runs every registered method at its defaults).";

/// Parsed `--flag value` arguments (flags may repeat).
struct Args {
    values: BTreeMap<String, Vec<String>>,
    switches: Vec<String>,
}

const SWITCHES: [&str; 3] = ["bos", "replot", "resume"];

impl Args {
    fn parse(raw: &[String]) -> Result<Self> {
        let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut switches = Vec::new();
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(EvalError::Usage(format!(
                    "unexpected argument `{a}`\n\n{USAGE}"
                )));
            };
            if SWITCHES.contains(&name) {
                switches.push(name.to_owned());
                continue;
            }
            let v = it
                .next()
                .ok_or_else(|| EvalError::Usage(format!("--{name} needs a value")))?;
            values.entry(name.to_owned()).or_default().push(v.clone());
        }
        Ok(Args { values, switches })
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.values
            .get(k)
            .and_then(|v| v.last())
            .map(String::as_str)
    }
    fn all(&self, k: &str) -> &[String] {
        self.values.get(k).map_or(&[], Vec::as_slice)
    }
    fn flag(&self, k: &str) -> bool {
        self.switches.iter().any(|s| s == k)
    }
    fn usize(&self, k: &str) -> Result<Option<usize>> {
        self.get(k)
            .map(|v| {
                v.parse()
                    .map_err(|_| EvalError::Usage(format!("--{k} `{v}` is not a count")))
            })
            .transpose()
    }
    fn need_usize(&self, k: &str) -> Result<usize> {
        self.usize(k)?
            .ok_or_else(|| EvalError::Usage(format!("--{k} is required\n\n{USAGE}")))
    }
    fn check_known(&self, known: &[&str]) -> Result<()> {
        for k in self.values.keys().chain(&self.switches) {
            if !known.contains(&k.as_str()) {
                return Err(EvalError::Usage(format!("unknown option --{k}\n\n{USAGE}")));
            }
        }
        Ok(())
    }
}

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&raw) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn run(raw: &[String]) -> Result<()> {
    let Some(cmd) = raw.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    // `calibrate` parses its own flags (kv_eval::calibrate).
    if cmd == "calibrate" {
        return kv_eval::calibrate::run(&raw[1..]);
    }
    // `fisher` too (kv_eval::fisher).
    if cmd == "fisher" {
        return kv_eval::fisher::run(&raw[1..]);
    }
    let args = Args::parse(&raw[1..])?;
    match cmd.as_str() {
        "ppl" => cmd_ppl(&args),
        "kept" => cmd_kept(&args),
        "forward" => cmd_forward(&args),
        "compare" => cmd_compare(&args),
        "fidelity" => cmd_fidelity(&args),
        "needle" => cmd_needle(&args),
        "sweep" => cmd_sweep(&args),
        "speed" => cmd_speed(&args),
        "prefix" => cmd_prefix(&args),
        "methods" => {
            let rows: Vec<Vec<String>> = method::registry()
                .iter()
                .map(|e| {
                    let mut p: Vec<&str> = e.params.to_vec();
                    if e.takes_ratio {
                        p.insert(0, "ratio");
                    }
                    vec![
                        e.name.to_owned(),
                        e.builder.role().to_owned(),
                        p.join(","),
                        e.summary.to_owned(),
                    ]
                })
                .collect();
            let mut rows = rows;
            rows.extend(method::WHOLE_MODEL.iter().map(|(name, what)| {
                vec![
                    (*name).to_owned(),
                    "cross-layer".to_owned(),
                    String::new(),
                    (*what).to_owned(),
                ]
            }));
            println!("{}", table(&["method", "role", "params", "what"], &rows));
            Ok(())
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(EvalError::Usage(format!(
            "unknown command `{other}`\n\n{USAGE}"
        ))),
    }
}

const COMMON: [&str; 5] = ["model", "text", "start-at", "tokenizer", "json"];

fn load(args: &Args) -> Result<(LoadedModel, PathBuf, PathBuf)> {
    let model_path = args
        .get("model")
        .map_or_else(assets::default_model_path, PathBuf::from);
    let text_path = args
        .get("text")
        .map_or_else(|| assets::book_path("prideprejudice"), PathBuf::from);
    let device = kv_testkit::test_device();
    let t = Instant::now();
    let loaded = assets::load_model(&model_path, args.get("tokenizer").map(Path::new), &device)?;
    eprintln!(
        "loaded {} in {:.1}s on {device:?}",
        model_path.display(),
        t.elapsed().as_secs_f64()
    );
    Ok((loaded, model_path, text_path))
}

fn token_ids(
    loaded: &LoadedModel,
    text_path: &Path,
    start_at: Option<&str>,
    bos: bool,
) -> Result<Vec<u32>> {
    let text = assets::read_text(text_path, start_at)?;
    // Tokenize a generous prefix only (BPE cost is linear; books are long).
    let mut ids = Vec::new();
    if bos {
        ids.extend(loaded.tokenizer.bos_id());
    }
    ids.extend(loaded.tokenizer.encode(&text));
    Ok(ids)
}

fn stages(args: &Args) -> Result<PipelineSpec> {
    let given = ["method", "pipeline", "config"]
        .iter()
        .filter(|k| args.get(k).is_some())
        .count();
    if given > 1 {
        return Err(EvalError::Usage(
            "give one of --method, --pipeline, --config".into(),
        ));
    }
    let spec = if let Some(p) = args.get("pipeline") {
        PipelineSpec::parse_line(p)?
    } else if let Some(path) = args.get("config") {
        PipelineSpec::from_path(std::path::Path::new(path))?
    } else {
        let mut spec = MethodSpec::new(args.get("method").unwrap_or("full"));
        if let Some(r) = args.get("ratio") {
            spec.set_param("ratio", r)?;
        }
        for p in args.all("param") {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| EvalError::Usage(format!("--param `{p}` is not key=value")))?;
            spec.set_param(k, v)?;
        }
        // `--method` also takes a one-line pipeline.
        if spec.params.is_empty() && spec.ratio.is_none() && spec.name.contains(['|', ':']) {
            PipelineSpec::parse_line(&spec.name)?
        } else {
            PipelineSpec::single(spec)
        }
    };
    method::check(&spec)?;
    Ok(spec)
}

fn write_json<T: serde::Serialize>(args: &Args, value: &T) -> Result<()> {
    if let Some(path) = args.get("json") {
        let s = serde_json::to_string_pretty(value).map_err(|e| EvalError::Usage(e.to_string()))?;
        std::fs::write(path, s + "\n").map_err(|e| EvalError::Io {
            path: path.into(),
            source: e,
        })?;
        eprintln!("wrote {path}");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments, reason = "one call site per command")]
fn run_ppl(
    loaded: &LoadedModel,
    ids: &[u32],
    stages: PipelineSpec,
    protocol: Protocol,
    prefill: usize,
    score: usize,
    max_windows: Option<usize>,
    label: (String, String, Option<String>, bool),
) -> Result<PplReport> {
    let model = &loaded.model;
    let mut caches = caches_for(loaded, &stages)?;
    let span = prefill + score;
    let starts: Vec<usize> = match protocol {
        Protocol::A | Protocol::Stream => vec![0],
        Protocol::Windows => {
            let n = ids.len() / span;
            (0..n.min(max_windows.unwrap_or(usize::MAX)))
                .map(|i| i * span)
                .collect()
        }
    };
    if starts.is_empty() || ids.len() < span {
        return Err(EvalError::Text(format!(
            "need at least {span} tokens, the text gives {}",
            ids.len()
        )));
    }
    let mut windows = Vec::with_capacity(starts.len());
    for (i, &s) in starts.iter().enumerate() {
        let w = ppl::run_window(
            model,
            &mut caches,
            &ids[s..s + span],
            prefill,
            score,
            protocol == Protocol::Stream,
            s,
        )?;
        eprintln!(
            "[{}/{}] {} window at token {s}: ppl {:.3}",
            i + 1,
            starts.len(),
            stages_line(&stages),
            w.ppl
        );
        windows.push(w);
    }
    let (m, t, start_at, bos) = label;
    Ok(PplReport::from_windows(
        windows,
        stages,
        protocol,
        prefill,
        score,
        m,
        t,
        start_at,
        bos,
        format!("{:?}", model.device()),
    ))
}

fn stages_line(stages: &PipelineSpec) -> String {
    stages.to_line()
}

fn cmd_ppl(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend([
        "prefill", "score", "protocol", "windows", "method", "ratio", "param", "pipeline",
        "config", "bos",
    ]);
    args.check_known(&known)?;
    let stages = stages(args)?;
    let protocol: Protocol = args.get("protocol").unwrap_or("a").parse()?;
    let (prefill, score) = (args.need_usize("prefill")?, args.need_usize("score")?);
    let (loaded, mp, tp) = load(args)?;
    let ids = token_ids(&loaded, &tp, args.get("start-at"), args.flag("bos"))?;
    let label = (
        mp.display().to_string(),
        tp.display().to_string(),
        args.get("start-at").map(str::to_owned),
        args.flag("bos"),
    );
    let r = run_ppl(
        &loaded,
        &ids,
        stages,
        protocol,
        prefill,
        score,
        args.usize("windows")?,
        label,
    )?;
    println!("{}", table(&PPL_HEADER, &[ppl_row(&r, None)]));
    if protocol == Protocol::Windows {
        println!(
            "{} windows: ppl mean {:.3} std {:.3}",
            r.windows.len(),
            r.window_ppl_mean,
            r.window_ppl_std
        );
    }
    write_json(args, &r)
}

fn cmd_kept(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend([
        "tokens", "prefill", "method", "ratio", "param", "pipeline", "config",
    ]);
    args.check_known(&known)?;
    let stages = stages(args)?;
    let (n, prefill) = (args.need_usize("tokens")?, args.need_usize("prefill")?);
    let (loaded, _, tp) = load(args)?;
    let ids = token_ids(&loaded, &tp, args.get("start-at"), false)?;
    if ids.len() < n {
        return Err(EvalError::Text(format!(
            "need {n} tokens, the text gives {}",
            ids.len()
        )));
    }
    let model = &loaded.model;
    let mut caches = caches_for(&loaded, &stages)?;
    let layers = kept_positions(model, &mut caches, &ids[..n], prefill)?;
    let rows: Vec<Vec<String>> = layers
        .iter()
        .enumerate()
        .map(|(l, heads)| {
            vec![
                l.to_string(),
                heads
                    .iter()
                    .map(|h| h.len().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    println!("{}", table(&["layer", "kept per KV head"], &rows));
    let report = KeptReport {
        layers,
        method: stages_line(&stages),
        stages,
        tokens: n,
        prefill,
    };
    write_json(args, &report)
}

fn cmd_forward(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend(["tokens", "bos"]);
    args.check_known(&known)?;
    let n = args.need_usize("tokens")?;
    let (loaded, _, tp) = load(args)?;
    let ids = token_ids(&loaded, &tp, args.get("start-at"), args.flag("bos"))?;
    if ids.len() < n || n < 2 {
        return Err(EvalError::Text(format!(
            "need {n} >= 2 tokens, the text gives {}",
            ids.len()
        )));
    }
    let model = &loaded.model;
    let mut caches = caches_for(&loaded, &PipelineSpec::single(MethodSpec::full()))?;
    let t = Instant::now();
    let nll = ppl::full_forward_nll(model, &mut caches, &ids[..n])?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "one forward over {n} tokens: nll {nll:.5}, ppl {:.3} ({:.0} tok/s)",
        nll.exp(),
        n as f64 / secs
    );
    write_json(
        args,
        &serde_json::json!({"tokens": n, "nll": nll, "ppl": nll.exp(), "tokens_per_s": n as f64 / secs}),
    )
}

fn cmd_compare(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend(["prefill", "score", "protocol", "methods", "windows"]);
    args.check_known(&known)?;
    let start_at = args
        .get("start-at")
        .unwrap_or("It is a truth universally")
        .to_owned();
    let prefill = args.usize("prefill")?.unwrap_or(3072);
    let score = args.usize("score")?.unwrap_or(1024);
    let protocol: Protocol = args.get("protocol").unwrap_or("a").parse()?;
    let names: Vec<String> = match args.get("methods").unwrap_or("default") {
        "all" => method::registry()
            .iter()
            .map(|e| e.name.to_owned())
            .collect(),
        // One representative setting per family, sized to finish in minutes on 2 cores.
        "default" => {
            let reg = method::registry();
            DEFAULT_COMPARE
                .iter()
                .filter(|s| {
                    s.split('|')
                        .all(|st| reg.iter().any(|e| st.split(':').next() == Some(e.name)))
                })
                .map(|s| (*s).to_owned())
                .collect()
        }
        list => method_list(list),
    };
    let specs: Vec<PipelineSpec> = names
        .iter()
        .map(|n| PipelineSpec::parse_line(n))
        .collect::<Result<_, _>>()?;
    for s in &specs {
        method::check(s)?;
    }
    let (reports, mp, tp) = run_specs(args, specs, &start_at, protocol, prefill, score)?;
    let full = reports.iter().find(|r| r.method == "full").map(|r| r.ppl);
    let rows: Vec<Vec<String>> = reports.iter().map(|r| ppl_row(r, full)).collect();
    println!(
        "\nprotocol {protocol:?}: prefill {prefill}, score {score}, text {} from {start_at:?}, model {}\n",
        tp.display(),
        mp.display()
    );
    println!("{}", table(&PPL_HEADER, &rows));
    println!("\nreference (HF transformers fp32, same model/text/protocol): full cache ppl 20.742");
    write_json(args, &reports)
}

/// What `compare` runs without `--methods`: the full cache and one representative setting of
/// each method family (the registered ones among these).
const DEFAULT_COMPARE: [&str; 9] = [
    "full",
    "snapkv:ratio=0.5",
    "streaming_llm:ratio=0.5",
    "expected_attention:ratio=0.5",
    "pyramidkv:ratio=0.5",
    "kivi:bits=4",
    "kivi:bits=2",
    "q4_0",
    // The pipeline that stores >= 10x fewer bytes than fp16 within +3% (docs/techniques/compose.md).
    "snapkv:ratio=0.75|kivi:bits=4",
];

const METHOD_OPTS: [&str; 5] = ["method", "ratio", "param", "pipeline", "config"];

fn list<T: std::str::FromStr>(args: &Args, key: &str, default: &str) -> Result<Vec<T>> {
    args.get(key)
        .unwrap_or(default)
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| EvalError::Usage(format!("--{key}: `{v}` is not valid")))
        })
        .collect()
}

/// Splits a `--methods` list: on `;` when it has one, else on `,` except before a
/// `key=value` piece that is not a method of its own (no `:` or `|` before its `=`), which
/// continues the previous method's parameters: `kivi:bits=2,group=64,q4_0` is two methods.
fn method_list(list: &str) -> Vec<String> {
    if list.contains(';') {
        return list
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
    }
    let mut out: Vec<String> = Vec::new();
    for piece in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let continues = piece
            .split_once('=')
            .is_some_and(|(head, _)| !head.contains(':') && !head.contains('|'));
        match out.last_mut() {
            Some(last) if continues => {
                last.push(',');
                last.push_str(piece);
            }
            _ => out.push(piece.to_owned()),
        }
    }
    out
}

fn caches_for(loaded: &LoadedModel, stages: &PipelineSpec) -> Result<kv_core::LayerCaches> {
    let m = &loaded.model;
    method::build_caches(
        stages,
        m.config().num_hidden_layers,
        m.kv_shape(1)?,
        m.rope().config(),
        m.device(),
    )
}

fn cmd_fidelity(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend(["prefill", "score"]);
    known.extend(METHOD_OPTS);
    args.check_known(&known)?;
    let stages = stages(args)?;
    let (p, c) = (args.need_usize("prefill")?, args.need_usize("score")?);
    let (loaded, _, tp) = load(args)?;
    let ids = token_ids(&loaded, &tp, args.get("start-at"), false)?;
    let layers = fidelity::measure(&loaded.model, caches_for(&loaded, &stages)?, &ids, p, c)?;
    let rows: Vec<Vec<String>> = layers
        .iter()
        .map(|l| {
            vec![
                l.layer.to_string(),
                format!("{:.2e}", l.attn_rel_err_prefill),
                format!("{:.2e}", l.attn_rel_err_score),
                format!("{:.2e}", l.key_rel_err),
                format!("{:.2e}", l.value_rel_err),
                format!("{:.3}", l.kept_fraction),
                format!("{:.2}", l.memory_after_prefill.bits_per_element()),
            ]
        })
        .collect();
    println!("method {}", stages_line(&stages));
    println!(
        "{}",
        table(
            &[
                "layer",
                "attn err (prefill)",
                "attn err (score)",
                "K err",
                "V err",
                "kept",
                "bits/elt"
            ],
            &rows
        )
    );
    write_json(
        args,
        &serde_json::json!({"method": stages_line(&stages), "stages": stages, "prefill": p, "score": c, "layers": layers}),
    )
}

fn cmd_needle(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend(["lengths", "depths", "seed"]);
    known.extend(METHOD_OPTS);
    args.check_known(&known)?;
    let stages = stages(args)?;
    let lengths: Vec<usize> = list(args, "lengths", "2048,4096,8192")?;
    let depths: Vec<f64> = list(args, "depths", "0.1,0.5,0.9")?;
    let seed: u64 = args
        .get("seed")
        .unwrap_or("0")
        .parse()
        .map_err(|_| EvalError::Usage("--seed is not a number".into()))?;
    let (loaded, _, tp) = load(args)?;
    let haystack = token_ids(&loaded, &tp, args.get("start-at"), false)?;
    let mut caches = caches_for(&loaded, &stages)?;
    let mut trials = Vec::new();
    for &len in &lengths {
        for &depth in &depths {
            let t = needle::run_trial(
                &loaded.model,
                &loaded.tokenizer,
                &mut caches,
                &haystack,
                len,
                depth,
                seed,
            )?;
            eprintln!(
                "length {len} depth {depth}: key {} -> {:?} {}",
                t.key,
                t.answer,
                if t.found { "found" } else { "missed" }
            );
            trials.push(t);
        }
    }
    let rows: Vec<Vec<String>> = lengths
        .iter()
        .map(|&len| {
            let ts: Vec<&needle::NeedleTrial> = trials.iter().filter(|t| t.length == len).collect();
            let found = ts.iter().filter(|t| t.found).count();
            let ratio =
                ts.iter().map(|t| t.compression_ratio).sum::<f64>() / ts.len().max(1) as f64;
            vec![
                len.to_string(),
                format!("{found}/{}", ts.len()),
                format!("{ratio:.2}x"),
            ]
        })
        .collect();
    println!("method {}", stages_line(&stages));
    println!("{}", table(&["length", "found", "vs fp16"], &rows));
    let found = trials.iter().filter(|t| t.found).count();
    write_json(
        args,
        &serde_json::json!({"method": stages_line(&stages), "stages": stages, "accuracy": found as f64 / trials.len().max(1) as f64, "trials": trials}),
    )
}

fn cmd_speed(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend(["contexts", "decode"]);
    known.extend(METHOD_OPTS);
    args.check_known(&known)?;
    let stages = stages(args)?;
    let contexts: Vec<usize> = list(args, "contexts", "1024,4096")?;
    let steps = args.usize("decode")?.unwrap_or(32);
    let (loaded, _, tp) = load(args)?;
    let ids = token_ids(&loaded, &tp, args.get("start-at"), false)?;
    let mut caches = caches_for(&loaded, &stages)?;
    let mut results = Vec::new();
    for &ctx in &contexts {
        let r = speed::measure(&loaded.model, &mut caches, &ids, ctx, steps)?;
        eprintln!(
            "context {ctx}: prefill {:.1} tok/s, decode {:.2} tok/s",
            r.prefill_tokens_per_s, r.decode_tokens_per_s
        );
        results.push(r);
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.context.to_string(),
                format!("{:.1}", r.prefill_tokens_per_s),
                format!("{:.2}", r.decode_tokens_per_s),
            ]
        })
        .collect();
    println!(
        "method {} on {:?}",
        stages_line(&stages),
        loaded.model.device()
    );
    println!(
        "{}",
        table(&["context", "prefill tok/s", "decode tok/s"], &rows)
    );
    write_json(
        args,
        &serde_json::json!({"method": stages_line(&stages), "device": format!("{:?}", loaded.model.device()), "results": results}),
    )
}

/// Sequences sharing a prefix through one ChunkAttention store vs each alone (dense cache).
fn cmd_prefix(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend(["sequences", "prefix", "suffix", "decode", "chunk"]);
    args.check_known(&known)?;
    let settings = kv_eval::prefix::PrefixSettings {
        sequences: args.usize("sequences")?.unwrap_or(4),
        prefix: args.usize("prefix")?.unwrap_or(2048),
        suffix: args.usize("suffix")?.unwrap_or(256),
        decode: args.usize("decode")?.unwrap_or(16),
        chunk_size: args.usize("chunk")?.unwrap_or(kv_core::DEFAULT_CHUNK_SIZE),
    };
    let (loaded, _, tp) = load(args)?;
    let ids = token_ids(&loaded, &tp, args.get("start-at"), false)?;
    let r = kv_eval::prefix::run(&loaded.model, &ids, settings)?;
    let mib = |b: usize| format!("{:.2}", b as f64 / (1024.0 * 1024.0));
    let rows: Vec<Vec<String>> = (0..r.sequences)
        .map(|s| {
            vec![
                s.to_string(),
                format!("{:.4}", r.ppl_dense[s]),
                format!("{:.4}", r.ppl_chunked[s]),
            ]
        })
        .collect();
    println!(
        "{} sequences: prefix {} + suffix {} tokens ({} batched, {} decode steps), chunk {}",
        r.sequences,
        r.prefix,
        r.suffix,
        r.suffix - 1 - r.decode_steps,
        r.decode_steps,
        r.chunk_size
    );
    println!(
        "{}",
        table(&["sequence", "ppl dense alone", "ppl chunked batch"], &rows)
    );
    println!(
        "max |logit diff| vs dense alone: {:.3e} (decode steps: {:.3e})",
        r.max_abs_logit_diff, r.max_abs_logit_diff_decode
    );
    println!(
        "{}",
        table(
            &["storage (all layers)", "MiB", "chunks"],
            &[
                vec![
                    "chunked, shared prefix".into(),
                    mib(r.chunked_bytes),
                    format!("{} ({} shared)", r.chunks, r.shared_chunks),
                ],
                vec![
                    "chunked, no sharing (K/V)".into(),
                    mib(r.chunked_unshared_kv_bytes),
                    String::new(),
                ],
                vec![
                    "dense, each sequence alone".into(),
                    mib(r.dense_bytes),
                    String::new(),
                ],
            ]
        )
    );
    println!(
        "wall time: chunked {:.1}s (prefix prefilled once), dense {:.1}s",
        r.chunked_seconds, r.dense_seconds
    );
    write_json(args, &r)
}

fn cmd_sweep(args: &Args) -> Result<()> {
    let mut known = COMMON.to_vec();
    known.extend([
        "prefill", "score", "protocol", "methods", "ratios", "windows", "out", "replot", "resume",
    ]);
    args.check_known(&known)?;
    let out = PathBuf::from(
        args.get("out")
            .ok_or_else(|| EvalError::Usage(format!("--out DIR is required\n\n{USAGE}")))?,
    );
    if args.flag("replot") {
        // Re-render the table and plot from DIR/sweep.json without running anything.
        let path = out.join("sweep.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EvalError::Io {
            path: path.clone(),
            source: e,
        })?;
        let reports: Vec<PplReport> = serde_json::from_str(&text)
            .map_err(|e| EvalError::Usage(format!("{}: {e}", path.display())))?;
        return write_sweep(&out, &reports);
    }
    let start_at = args
        .get("start-at")
        .unwrap_or("It is a truth universally")
        .to_owned();
    let prefill = args.usize("prefill")?.unwrap_or(3072);
    let score = args.usize("score")?.unwrap_or(1024);
    let protocol: Protocol = args.get("protocol").unwrap_or("a").parse()?;
    let ratios: Vec<f64> = list(args, "ratios", "0.5,0.75,0.9")?;
    let reg = method::registry();
    let names: Vec<String> = match args.get("methods").unwrap_or("all") {
        "all" => reg.iter().map(|e| e.name.to_owned()).collect(),
        l => method_list(l),
    };
    // Every method at every ratio it takes; methods without a ratio once. `full` always runs.
    let mut grid: Vec<PipelineSpec> = vec![PipelineSpec::single(MethodSpec::full())];
    for n in &names {
        let p = PipelineSpec::parse_line(n)?;
        method::check(&p)?;
        let first = &p.stages[0];
        if first.name == "full" && p.stages.len() == 1 {
            continue;
        }
        // The ratio sweeps the first stage (the selection of a pipeline) unless it is given.
        let takes_ratio = method::lookup(first).is_ok_and(|e| e.takes_ratio);
        if takes_ratio && first.ratio.is_none() {
            for &r in &ratios {
                let mut q = p.clone();
                q.stages[0].set_param("ratio", &r.to_string())?;
                grid.push(q);
            }
        } else {
            grid.push(p);
        }
    }
    // The table, plot and JSON are rewritten after every run, so an interrupted sweep leaves
    // its finished rows; `--resume` keeps the rows of DIR/sweep.json that are in the grid and
    // runs the others.
    let mut done: Vec<PplReport> = Vec::new();
    if args.flag("resume") {
        let path = out.join("sweep.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            done = serde_json::from_str(&text)
                .map_err(|e| EvalError::Usage(format!("{}: {e}", path.display())))?;
        }
    }
    let (loaded, mp, tp) = load(args)?;
    let ids = token_ids(&loaded, &tp, Some(&start_at), false)?;
    let total = grid.len();
    let mut reports: Vec<PplReport> = Vec::with_capacity(total);
    for (i, spec) in grid.into_iter().enumerate() {
        let line = spec.to_line();
        if let Some(at) = done.iter().position(|r| report_line(r) == line) {
            eprintln!("[{}/{total}] {line} (kept from sweep.json)", i + 1);
            reports.push(done.swap_remove(at));
            continue;
        }
        eprintln!("[{}/{total}] {line}", i + 1);
        let label = (
            mp.display().to_string(),
            tp.display().to_string(),
            Some(start_at.clone()),
            false,
        );
        let windows = args.usize("windows")?;
        reports.push(run_ppl(
            &loaded, &ids, spec, protocol, prefill, score, windows, label,
        )?);
        write_sweep(&out, &reports)?;
    }
    write_sweep(&out, &reports)
}

/// The pipeline line of a sweep report (what `PipelineSpec::to_line` gives for its spec).
fn report_line(r: &PplReport) -> String {
    let mut p = PipelineSpec::new(r.stages.clone());
    p.evicted = r.evicted.clone();
    p.to_line()
}

/// Writes `DIR/sweep.{svg,png,md,json}` from sweep results (the first report is the full
/// cache).
fn write_sweep(out: &std::path::Path, reports: &[PplReport]) -> Result<()> {
    let full = reports.first().map(|r| r.ppl);
    let (protocol, prefill, score) = reports
        .first()
        .map_or((Protocol::A, 0, 0), |r| (r.protocol, r.prefill, r.score));
    let rows: Vec<Vec<String>> = reports.iter().map(|r| ppl_row(r, full)).collect();
    let tbl = table(&PPL_HEADER, &rows);
    println!("{tbl}");
    // One series per method name, points ordered by stored bytes.
    let mut series: Vec<Series> = Vec::new();
    for r in reports.iter().skip(1) {
        // A series per method, or per pipeline with the ratio taken out.
        let name = {
            let mut p = PipelineSpec::new(r.stages.clone());
            p.evicted = r.evicted.clone();
            if let Some(s) = p.stages.first_mut() {
                s.ratio = None;
            }
            p.to_line()
        };
        let p = (r.stored_bytes as f64 / (1024.0 * 1024.0), r.ppl);
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(p),
            None => series.push(Series {
                name,
                points: vec![p],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let plot = Plot {
        title: format!(
            "Perplexity vs stored KV bytes (protocol {protocol:?}, prefill {prefill}, score {score})"
        ),
        x_label: "stored KV cache after prefill (MiB, all layers)".into(),
        y_label: "perplexity".into(),
        series,
        reference: full.map(|f| (format!("full cache {f:.3}"), f)),
    };
    std::fs::create_dir_all(out).map_err(|e| EvalError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    let write = |name: &str, bytes: &[u8]| {
        let p = out.join(name);
        std::fs::write(&p, bytes).map_err(|e| EvalError::Io { path: p, source: e })
    };
    write("sweep.svg", plot.to_svg().as_bytes())?;
    write("sweep.png", &plot.to_png()?)?;
    write("sweep.md", format!("```\n{tbl}\n```\n").as_bytes())?;
    let json =
        serde_json::to_string_pretty(reports).map_err(|e| EvalError::Usage(e.to_string()))?;
    write("sweep.json", json.as_bytes())?;
    eprintln!("wrote sweep.{{svg,png,md,json}} to {}", out.display());
    Ok(())
}

/// Loads the model and text once and runs `ppl` for each single-stage spec, in order.
fn run_specs(
    args: &Args,
    specs: Vec<PipelineSpec>,
    start_at: &str,
    protocol: Protocol,
    prefill: usize,
    score: usize,
) -> Result<(Vec<PplReport>, PathBuf, PathBuf)> {
    let (loaded, mp, tp) = load(args)?;
    let ids = token_ids(&loaded, &tp, Some(start_at), false)?;
    let total = specs.len();
    let mut reports = Vec::with_capacity(total);
    for (i, spec) in specs.into_iter().enumerate() {
        eprintln!("[{}/{total}] {}", i + 1, spec.to_line());
        let label = (
            mp.display().to_string(),
            tp.display().to_string(),
            Some(start_at.to_owned()),
            false,
        );
        let windows = args.usize("windows")?;
        reports.push(run_ppl(
            &loaded, &ids, spec, protocol, prefill, score, windows, label,
        )?);
    }
    Ok((reports, mp, tp))
}

#[cfg(test)]
mod tests {
    use super::method_list;

    #[test]
    fn method_lists_keep_parameters_with_their_method() {
        assert_eq!(
            method_list("kivi:bits=2,group=64,q4_0, snapkv:ratio=0.5|kivi:bits=4,residual=64"),
            [
                "kivi:bits=2,group=64",
                "q4_0",
                "snapkv:ratio=0.5|kivi:bits=4,residual=64"
            ]
        );
        assert_eq!(method_list("full,kivi"), ["full", "kivi"]);
        assert_eq!(
            method_list("palu:rank=24,calibration=c.st;kivi:bits=2"),
            ["palu:rank=24,calibration=c.st", "kivi:bits=2"]
        );
    }
}
