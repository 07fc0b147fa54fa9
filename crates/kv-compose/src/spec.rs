//! What users write: one stage ([`MethodSpec`]) and a pipeline of stages ([`PipelineSpec`]),
//! in code, as a one-liner, or as a versioned JSON or TOML config.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::{ComposeError, Result};

/// The config version this library reads and writes.
pub const CONFIG_VERSION: u32 = 1;

/// The one-line prefix of the stage that receives the tokens a selection evicts.
pub const EVICTED_PREFIX: &str = "evicted=";

/// One method (one pipeline stage) with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    /// The method's name (kvpress's name where kvpress has the method).
    pub name: String,
    /// The fraction of tokens removed (kvpress's `compression_ratio`), for methods that take it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ratio: Option<f64>,
    /// Further parameters, `key=value`. Config files may give numbers and booleans; they are
    /// kept as their text.
    #[serde(
        skip_serializing_if = "BTreeMap::is_empty",
        default,
        deserialize_with = "scalar_map"
    )]
    pub params: BTreeMap<String, String>,
}

fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        F(f64),
        B(bool),
    }
    let m = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(m.into_iter()
        .map(|(k, v)| {
            let v = match v {
                Scalar::S(s) => s,
                Scalar::I(i) => i.to_string(),
                Scalar::F(f) => f.to_string(),
                Scalar::B(b) => b.to_string(),
            };
            (k, v)
        })
        .collect())
}

impl MethodSpec {
    /// A method without parameters.
    pub fn new(name: impl Into<String>) -> Self {
        MethodSpec {
            name: name.into(),
            ratio: None,
            params: BTreeMap::new(),
        }
    }

    /// The full cache.
    pub fn full() -> Self {
        MethodSpec::new("full")
    }

    /// Sets the ratio (the fraction of tokens removed).
    pub fn with_ratio(mut self, ratio: f64) -> Self {
        self.ratio = Some(ratio);
        self
    }

    /// Sets a parameter (not checked until the pipeline is built).
    pub fn with(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.params.insert(key.into(), value.to_string());
        self
    }

    /// Parses one stage of the one-line form: `name` or `name:key=value,key=value`
    /// (`ratio=R` becomes [`MethodSpec::ratio`]).
    ///
    /// # Errors
    /// [`ComposeError::Syntax`] for an empty name or a parameter without `=`;
    /// [`ComposeError::BadParam`] for a ratio that is not a number in `[0, 1)`.
    pub fn parse_stage(stage: &str) -> Result<Self> {
        let (name, rest) = match stage.split_once(':') {
            Some((n, r)) => (n.trim(), Some(r)),
            None => (stage.trim(), None),
        };
        if name.is_empty() {
            return Err(ComposeError::Syntax {
                at: format!("stage `{stage}`"),
                reason: "no method name".into(),
            });
        }
        let mut spec = MethodSpec::new(name);
        for kv in rest
            .into_iter()
            .flat_map(|r| r.split(','))
            .filter(|s| !s.trim().is_empty())
        {
            let (k, v) = kv.split_once('=').ok_or_else(|| ComposeError::Syntax {
                at: format!("stage `{stage}`"),
                reason: format!("parameter `{kv}` is not key=value"),
            })?;
            spec.set_param(k.trim(), v.trim())
                .map_err(|e| relocate(e, &format!("stage `{stage}`")))?;
        }
        Ok(spec)
    }

    /// Sets a parameter; `ratio` is parsed into [`MethodSpec::ratio`].
    ///
    /// # Errors
    /// [`ComposeError::BadParam`] for a ratio that is not a number in `[0, 1)`.
    pub fn set_param(&mut self, key: &str, value: &str) -> Result<()> {
        if key == "ratio" {
            let r: f64 = value
                .parse()
                .map_err(|_| self.bad("ratio", "not a number"))?;
            self.ratio = Some(r);
            self.check_ratio("")?;
        } else {
            self.params.insert(key.to_owned(), value.to_owned());
        }
        Ok(())
    }

    /// Checks that the ratio, if any, is in `[0, 1)`.
    pub(crate) fn check_ratio(&self, at: &str) -> Result<()> {
        match self.ratio {
            Some(r) if !(0.0..1.0).contains(&r) => Err(relocate(
                self.bad("ratio", "must be in [0, 1): the fraction of tokens removed"),
                at,
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn bad(&self, param: &str, reason: &str) -> ComposeError {
        ComposeError::BadParam {
            at: String::new(),
            method: self.name.clone(),
            param: param.into(),
            reason: reason.into(),
        }
    }

    /// The one-line form of this stage.
    pub fn to_stage_string(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        if let Some(r) = self.ratio {
            parts.push(format!("ratio={r}"));
        }
        parts.extend(self.params.iter().map(|(k, v)| format!("{k}={v}")));
        if parts.is_empty() {
            self.name.clone()
        } else {
            format!("{}:{}", self.name, parts.join(","))
        }
    }
}

/// Sets the location of an error that has none yet.
pub(crate) fn relocate(e: ComposeError, at: &str) -> ComposeError {
    match e {
        ComposeError::BadParam {
            at: old,
            method,
            param,
            reason,
        } => ComposeError::BadParam {
            at: if old.is_empty() { at.to_owned() } else { old },
            method,
            param,
            reason,
        },
        ComposeError::UnknownMethod {
            at: old,
            name,
            known,
        } => ComposeError::UnknownMethod {
            at: if old.is_empty() { at.to_owned() } else { old },
            name,
            known,
        },
        other => other,
    }
}

/// A pipeline: stages applied in order (a prefill selection, then a storage codec), and
/// optionally a codec for the tokens the selection evicts (MiKV: keep them at low precision
/// instead of dropping them).
///
/// Serialised as a versioned config:
/// ```json
/// {"version": 1,
///  "stages": [{"name": "snapkv", "ratio": 0.75}, {"name": "kivi", "params": {"bits": 4}}],
///  "evicted": {"name": "kivi", "params": {"bits": 2}}}
/// ```
/// or TOML (`version = 1`, `[[stages]]` tables, an `[evicted]` table), or one line:
/// `snapkv:ratio=0.75|kivi:bits=4|evicted=kivi:bits=2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Config version ([`CONFIG_VERSION`]).
    pub version: u32,
    /// The stages, in the order data flows through them.
    pub stages: Vec<MethodSpec>,
    /// Where the tokens a selection evicts go (default: they are freed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evicted: Option<MethodSpec>,
}

impl PipelineSpec {
    /// A pipeline of the given stages.
    pub fn new(stages: Vec<MethodSpec>) -> Self {
        PipelineSpec {
            version: CONFIG_VERSION,
            stages,
            evicted: None,
        }
    }

    /// One method alone.
    pub fn single(spec: MethodSpec) -> Self {
        PipelineSpec::new(vec![spec])
    }

    /// Sends evicted tokens to `codec` instead of freeing them.
    pub fn with_evicted(mut self, codec: MethodSpec) -> Self {
        self.evicted = Some(codec);
        self
    }

    /// Parses the one-line form `stage|stage|...|evicted=stage`.
    ///
    /// # Errors
    /// [`ComposeError::Syntax`] for an empty pipeline or a malformed stage, two `evicted=`
    /// stages; [`ComposeError::BadParam`] for a bad ratio.
    pub fn parse_line(line: &str) -> Result<Self> {
        let mut stages = Vec::new();
        let mut evicted = None;
        for part in line.split('|').filter(|s| !s.trim().is_empty()) {
            if let Some(rest) = part.trim().strip_prefix(EVICTED_PREFIX) {
                if evicted.is_some() {
                    return Err(ComposeError::Syntax {
                        at: format!("stage `{part}`"),
                        reason: "a pipeline has at most one `evicted=` stage".into(),
                    });
                }
                evicted = Some(MethodSpec::parse_stage(rest)?);
            } else {
                stages.push(MethodSpec::parse_stage(part)?);
            }
        }
        if stages.is_empty() {
            return Err(ComposeError::Syntax {
                at: format!("pipeline `{line}`"),
                reason: "no stage".into(),
            });
        }
        Ok(PipelineSpec {
            version: CONFIG_VERSION,
            stages,
            evicted,
        })
    }

    /// The one-line form.
    pub fn to_line(&self) -> String {
        let mut parts: Vec<String> = self
            .stages
            .iter()
            .map(MethodSpec::to_stage_string)
            .collect();
        if let Some(e) = &self.evicted {
            parts.push(format!("{EVICTED_PREFIX}{}", e.to_stage_string()));
        }
        parts.join("|")
    }

    /// Parses a JSON config.
    ///
    /// # Errors
    /// [`ComposeError::Syntax`] with serde's line and column for malformed JSON, unknown
    /// fields or wrong types; [`ComposeError::Version`] for another version;
    /// [`ComposeError::BadParam`] for a ratio outside `[0, 1)`.
    pub fn from_json(text: &str) -> Result<Self> {
        let spec: PipelineSpec = serde_json::from_str(text).map_err(|e| ComposeError::Syntax {
            at: format!("JSON line {} column {}", e.line(), e.column()),
            reason: e.to_string(),
        })?;
        spec.checked()
    }

    /// Parses a TOML config.
    ///
    /// # Errors
    /// As [`PipelineSpec::from_json`] (the location is TOML's message).
    pub fn from_toml(text: &str) -> Result<Self> {
        let spec: PipelineSpec = toml::from_str(text).map_err(|e| ComposeError::Syntax {
            at: "TOML".into(),
            reason: e.to_string().trim_end().to_owned(),
        })?;
        spec.checked()
    }

    /// Reads a config file: TOML if its name ends in `.toml`, JSON otherwise.
    ///
    /// # Errors
    /// [`ComposeError::Syntax`] if the file cannot be read (naming the path), or as
    /// [`PipelineSpec::from_json`] / [`PipelineSpec::from_toml`].
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ComposeError::Syntax {
            at: path.display().to_string(),
            reason: format!("cannot read: {e}"),
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "toml") {
            PipelineSpec::from_toml(&text)
        } else {
            PipelineSpec::from_json(&text)
        };
        parsed.map_err(|e| match e {
            ComposeError::Syntax { at, reason } => ComposeError::Syntax {
                at: format!("{}: {at}", path.display()),
                reason,
            },
            other => other,
        })
    }

    /// The JSON config.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a PipelineSpec always serialises")
    }

    /// The TOML config.
    ///
    /// # Errors
    /// [`ComposeError::Syntax`] if TOML cannot represent the spec (it always can today).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| ComposeError::Syntax {
            at: "TOML".into(),
            reason: e.to_string(),
        })
    }

    /// Checks what parsing alone can check: the version, a non-empty stage list, ratios.
    fn checked(self) -> Result<Self> {
        if self.version != CONFIG_VERSION {
            return Err(ComposeError::Version {
                found: self.version,
                supported: CONFIG_VERSION,
            });
        }
        if self.stages.is_empty() {
            return Err(ComposeError::Syntax {
                at: "stages".into(),
                reason: "no stage".into(),
            });
        }
        for (i, s) in self.stages.iter().enumerate() {
            s.check_ratio(&format!("stages[{i}]"))?;
        }
        if let Some(e) = &self.evicted {
            e.check_ratio("evicted")?;
        }
        Ok(self)
    }
}
