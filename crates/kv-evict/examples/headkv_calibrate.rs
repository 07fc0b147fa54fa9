//! Calibrates HeadKV's head importance on a real model and writes the versioned JSON artefact
//! that `BudgetKind::HeadKv` loads.
//!
//! The retrieval test of FYYFU/HeadKV's `retrieval_head_detection.py`: a needle sentence is
//! hidden at several depths of a haystack (Austen's *Persuasion*; *Pride and Prejudice* is the
//! evaluation text, never used here), the model is asked about it and generates greedily; in
//! every trial whose answer recalls more than half of the needle's answer words (the prompt in
//! the model's chat template, user turn: book then question), a query head
//! scores `1 / needle_len` each time its most-attended token is the needle token the model is
//! emitting. The artefact holds each head's mean over those trials.
//!
//! ```text
//! cargo run -p kv-evict --example headkv_calibrate -- \
//!     [MODEL.gguf] [HAYSTACK.txt] [OUT.json] [CONTEXT_TOKENS,...]
//! ```
//!
//! Defaults: `assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, `assets/text/persuasion.txt`,
//! `crates/kv-evict/data/headkv_smollm2_135m_instruct.json`, contexts `256,512`.

#![expect(
    clippy::print_stdout,
    reason = "a command-line tool reporting progress"
)]

use std::error::Error;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kv_core::{KvCache, LayerCaches};
use kv_evict::{
    HEAD_IMPORTANCE_FORMAT, HEAD_IMPORTANCE_VERSION, HeadImportance, ProbeLog, RetrievalProbe,
    retrieval_scores,
};
use kv_model::gguf::GgufFile;
use kv_model::tokenizer::Tokenizer;
use kv_model::{HostWeights, Llama};

/// A needle: `lead` + `answer` is hidden in the text, `question` asks for `answer`.
struct Needle {
    lead: &'static str,
    answer: &'static str,
    question: &'static str,
}

const NEEDLES: &[Needle] = &[
    Needle {
        lead: "The password to the library at Kellynch is",
        answer: "purple elephant seventeen",
        question: "What is the password to the library at Kellynch?",
    },
    Needle {
        lead: "Captain Wentworth keeps his spare compass",
        answer: "inside the green teapot in the kitchen",
        question: "Where does Captain Wentworth keep his spare compass?",
    },
    Needle {
        lead: "The best thing to do in Bath is to",
        answer: "walk along the river and eat warm apple cake",
        question: "What is the best thing to do in Bath?",
    },
    Needle {
        lead: "Lady Russell's favourite number is",
        answer: "four hundred and twelve",
        question: "What is Lady Russell's favourite number?",
    },
];

const DEPTHS: &[f64] = &[0.1, 0.4, 0.7];
const MAX_NEW: usize = 24;

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// ROUGE-1 recall of `reference` in `response` (lower-cased alphanumeric words, counts
/// clipped; the reference uses `rouge_score` with stemming).
fn rouge1_recall(reference: &str, response: &str) -> f64 {
    let r = words(reference);
    let mut pool = words(response);
    let mut hit = 0;
    for w in &r {
        if let Some(i) = pool.iter().position(|x| x == w) {
            pool.swap_remove(i);
            hit += 1;
        }
    }
    hit as f64 / r.len().max(1) as f64
}

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| {
        args.get(i)
            .map_or_else(|| root.join(default), PathBuf::from)
    };
    let model_path = arg(0, "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let text_path = arg(1, "assets/text/persuasion.txt");
    let out_path = arg(2, "crates/kv-evict/data/headkv_smollm2_135m_instruct.json");
    let contexts: Vec<usize> = match args.get(3) {
        Some(s) => s.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![256, 512],
    };

    let device = kv_testkit::test_device();
    let file = GgufFile::open(&model_path)?;
    let tok = Tokenizer::from_gguf(&file)?;
    let model = Llama::new(&HostWeights::from_gguf(&file)?, &device)?;
    let cfg = model.config().clone();
    let shape = model.kv_shape(1)?;
    let text = std::fs::read_to_string(&text_path)?;
    // Unwrap the hard-wrapped lines into prose, skip the title page.
    let prose: String = text
        .split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .skip(6)
        .collect::<Vec<_>>()
        .join("\n");
    let max_ctx = contexts.iter().copied().max().unwrap_or(0);
    let hay = tok.encode(&prose[..prose.len().min(max_ctx * 8)]);
    // SmolLM2-Instruct's chat template (with the default system message of its HF template):
    // the instruct model answers `<|im_end|>` at once to a bare continuation prompt.
    let special = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| format!("the tokenizer has no `{t}` token"))
    };
    let (im_start, im_end) = (special("<|im_start|>")?, special("<|im_end|>")?);
    let mut head_ids = vec![im_start];
    head_ids.extend(
        tok.encode("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    );
    head_ids.push(im_end);
    head_ids.extend(tok.encode("\n"));
    head_ids.push(im_start);
    head_ids.extend(tok.encode("user\n"));
    let eos = Some(im_end);

    let (layers, heads) = (cfg.num_hidden_layers, cfg.num_attention_heads);
    let mut sums = vec![vec![0.0f64; heads]; layers];
    let (mut trials, mut successes) = (0usize, 0usize);
    let start = std::time::Instant::now();
    for needle in NEEDLES {
        let lead = tok.encode(&format!(" {}", needle.lead));
        let answer = tok.encode(&format!(" {}", needle.answer));
        let tail = tok.encode(".");
        let mut question = tok.encode(&format!(
            "\nBased on the content of the book, Question: {}",
            needle.question
        ));
        question.push(im_end);
        question.extend(tok.encode("\n"));
        question.push(im_start);
        question.extend(tok.encode("assistant\n"));
        for &ctx in &contexts {
            let body = ctx.saturating_sub(
                head_ids.len() + lead.len() + answer.len() + tail.len() + question.len(),
            );
            if body > hay.len() {
                return Err(format!("the haystack has {} tokens, {body} needed", hay.len()).into());
            }
            for &depth in DEPTHS {
                // Insert after a sentence end at or before the depth, as the reference does.
                let mut at = (depth * body as f64) as usize;
                while at > 0
                    && !tok
                        .decode_lossy(&hay[at - 1..at])
                        .map(|t| t.ends_with('.'))
                        .unwrap_or(false)
                {
                    at -= 1;
                }
                let mut prompt: Vec<u32> = head_ids.clone();
                prompt.extend(&hay[..at]);
                prompt.extend(&lead);
                let span = prompt.len()..prompt.len() + answer.len();
                prompt.extend(&answer);
                prompt.extend(&tail);
                prompt.extend(&hay[at..body]);
                prompt.extend(&question);

                let log = Arc::new(Mutex::new(ProbeLog::default()));
                let mut caches = LayerCaches::try_from_fn(layers, |l| {
                    Ok(
                        Box::new(RetrievalProbe::new(l, shape, log.clone(), &device)?)
                            as Box<dyn KvCache>,
                    )
                })?;
                let out = model.generate_greedy(&prompt, MAX_NEW, eos, &mut caches)?;
                let response = tok.decode_lossy(&out)?;
                let recall = rouge1_recall(needle.answer, &response);
                trials += 1;
                let ok = recall > 0.5;
                println!(
                    "ctx {ctx:>4} depth {depth:.1} `{}`: recall {recall:.2}{} ({:.0} s)",
                    response.trim(),
                    if ok { " -> scored" } else { "" },
                    start.elapsed().as_secs_f64()
                );
                if ok {
                    successes += 1;
                    let log = log.lock().map_err(|_| "poisoned probe log")?;
                    let s = retrieval_scores(&log, &prompt, span, &out)?;
                    for (acc, row) in sums.iter_mut().zip(&s) {
                        for (a, x) in acc.iter_mut().zip(row) {
                            *a += x;
                        }
                    }
                }
            }
        }
    }
    if successes == 0 {
        return Err(format!("none of {trials} trials retrieved its needle: no artefact").into());
    }
    let scores: Vec<Vec<f64>> = sums
        .into_iter()
        .map(|r| r.into_iter().map(|x| x / successes as f64).collect())
        .collect();
    let artefact = HeadImportance {
        format: HEAD_IMPORTANCE_FORMAT.into(),
        version: HEAD_IMPORTANCE_VERSION,
        model: model_path
            .file_stem()
            .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
        num_layers: layers,
        q_heads: heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: shape.head_dim(),
        method: format!(
            "HeadKV retrieval (copy) score, FYYFU/HeadKV retrieval_head_detection.py: top-1 \
             attention of each query head on the needle token being generated, 1/needle_len \
             per hit, mean over {successes} successful of {trials} trials (ROUGE-1 recall > \
             0.5); {} needles x contexts {contexts:?} tokens x depths {DEPTHS:?} in {}, \
             SmolLM2 chat template; greedy, at most {MAX_NEW} new tokens, stop at <|im_end|>",
            NEEDLES.len(),
            text_path
                .file_name()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
        ),
        trials: successes,
        scores,
    };
    artefact.check_model(layers, &shape)?;
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out_path, artefact.to_json()? + "\n")?;
    let mut top: Vec<(usize, usize, f64)> = artefact
        .scores
        .iter()
        .enumerate()
        .flat_map(|(l, r)| r.iter().enumerate().map(move |(h, &x)| (l, h, x)))
        .collect();
    top.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!(
        "{successes}/{trials} trials scored; top heads (layer-head: score): {}",
        top.iter()
            .take(10)
            .map(|(l, h, x)| format!("{l}-{h}: {x:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("wrote {}", out_path.display());
    Ok(())
}
