//! A stand-in for a native engine that owns its states: it does everything the engine's contract
//! requires at the Python boundary (read an event dict's fields, keep a per-key state, return a
//! result object holding the change dicts and the follow-up event dicts) and no status logic.
//! benchmarks/engine_floor.py tells it how many outputs the real engine gave for each event.
use blake2::digest::{Update, VariableOutput};
use blake2::Blake2bVar;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::collections::HashMap;
use std::fmt::Write;

#[pyclass(frozen)]
struct FloorResult {
    #[pyo3(get)]
    changed: bool,
    #[pyo3(get)]
    changes: Py<PyAny>,
    #[pyo3(get)]
    follow_ups: Py<PyAny>,
}

#[derive(Default)]
struct State {
    version: i64,
    last_at: i64,
    last_event: String,
    facts: Vec<(i64, i64)>,
}

/// Per-key states in a Rust map, as an engine owning its states would keep them.
#[pyclass]
struct Floor {
    states: HashMap<String, State>,
}

fn render(v: &Bound<'_, PyAny>, out: &mut String) -> PyResult<()> {
    if v.is_none() {
        out.push_str("None");
    } else if let Ok(s) = v.cast::<PyString>() {
        out.push_str(s.to_str()?);
    } else {
        let _ = write!(out, "{}", v.extract::<i64>()?);
    }
    Ok(())
}

fn hex16(text: &str) -> String {
    let mut h = Blake2bVar::new(16).expect("valid digest size");
    h.update(text.as_bytes());
    let mut buf = [0u8; 16];
    h.finalize_variable(&mut buf).expect("digest size");
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(32);
    for b in buf {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

fn field<'py>(ev: &Bound<'py, PyDict>, k: &Bound<'py, PyString>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match ev.get_item(k)? {
        Some(v) => v,
        None => ev.py().None().into_bound(ev.py()),
    })
}

#[pymethods]
impl Floor {
    #[new]
    fn new() -> Self {
        Floor { states: HashMap::new() }
    }

    /// The boundary work of one event: `n_changes` change dicts (13 keys, blake2b id) and
    /// `n_follow` follow-up event dicts, registrations (16 keys) when `registrations`, else
    /// outcomes (11 keys).
    fn apply<'py>(&mut self, py: Python<'py>, ev: Bound<'py, PyDict>, n_changes: usize, n_follow: usize,
                  registrations: bool) -> PyResult<Bound<'py, FloorResult>> {
        let etype = field(&ev, intern!(py, "type"))?;
        let eid = field(&ev, intern!(py, "event_id"))?;
        let at_obj = field(&ev, intern!(py, "occurred_at"))?;
        let at: i64 = at_obj.extract()?;
        let aid = field(&ev, intern!(py, "automation_id"))?;
        let cid = field(&ev, intern!(py, "contact_id"))?;
        let mid = field(&ev, intern!(py, "message_id"))?;
        let run = field(&ev, intern!(py, "run"))?;
        let step = field(&ev, intern!(py, "step_index"))?;
        let _reason = field(&ev, intern!(py, "reason"))?;
        let mut key = String::with_capacity(48);
        if registrations {
            render(&aid, &mut key)?;
            key.push('\x1f');
            render(&cid, &mut key)?;
        } else {
            render(&mid, &mut key)?;
        }
        let st = self.states.entry(key).or_default();
        st.version += 1;
        st.last_at = at;
        st.last_event.clear();
        render(&eid, &mut st.last_event)?;
        st.facts.push((at, st.version));
        if st.facts.len() > 8 {
            st.facts.clear();
        }
        let changes = PyList::empty(py);
        for _ in 0..n_changes {
            let mut text = String::with_capacity(128);
            render(&eid, &mut text)?;
            text.push_str("\x1fnode_state\x1f");
            for v in [&aid, &cid, &run, &step, &mid] {
                render(v, &mut text)?;
                text.push('\x1f');
            }
            text.push_str("waiting");
            let d = PyDict::new(py);
            d.set_item(intern!(py, "kind"), intern!(py, "node_state"))?;
            d.set_item(intern!(py, "automation_id"), &aid)?;
            d.set_item(intern!(py, "contact_id"), &cid)?;
            d.set_item(intern!(py, "run"), &run)?;
            d.set_item(intern!(py, "step_index"), &step)?;
            d.set_item(intern!(py, "message_id"), &mid)?;
            d.set_item(intern!(py, "from"), intern!(py, "scheduled"))?;
            d.set_item(intern!(py, "to"), intern!(py, "waiting"))?;
            d.set_item(intern!(py, "reason"), py.None())?;
            d.set_item(intern!(py, "event_id"), &eid)?;
            d.set_item(intern!(py, "event_type"), &etype)?;
            d.set_item(intern!(py, "occurred_at"), &at_obj)?;
            d.set_item(intern!(py, "change_id"), hex16(&text))?;
            changes.append(d)?;
        }
        let follow = PyList::empty(py);
        for _ in 0..n_follow {
            let d = PyDict::new(py);
            if registrations {
                d.set_item(intern!(py, "event_id"), &eid)?;
                d.set_item(intern!(py, "type"), intern!(py, "message.registered"))?;
                d.set_item(intern!(py, "occurred_at"), &at_obj)?;
                d.set_item(intern!(py, "schema_version"), 1)?;
                d.set_item(intern!(py, "message_id"), &mid)?;
                d.set_item(intern!(py, "automation_id"), &aid)?;
                d.set_item(intern!(py, "contact_id"), &cid)?;
                d.set_item(intern!(py, "run"), &run)?;
                d.set_item(intern!(py, "step_index"), &step)?;
                for k in [intern!(py, "mailing_id"), intern!(py, "subject"), intern!(py, "sending_user"),
                          intern!(py, "sending_email"), intern!(py, "email"), intern!(py, "name"),
                          intern!(py, "channel")] {
                    d.set_item(k, field(&ev, k)?)?;
                }
            } else {
                let mut id = String::from("outcome.settled:");
                render(&eid, &mut id)?;
                d.set_item(intern!(py, "event_id"), id)?;
                d.set_item(intern!(py, "type"), intern!(py, "outcome.settled"))?;
                d.set_item(intern!(py, "occurred_at"), &at_obj)?;
                d.set_item(intern!(py, "schema_version"), 1)?;
                d.set_item(intern!(py, "automation_id"), &aid)?;
                d.set_item(intern!(py, "contact_id"), &cid)?;
                d.set_item(intern!(py, "run"), &run)?;
                d.set_item(intern!(py, "step_index"), &step)?;
                d.set_item(intern!(py, "message_id"), &mid)?;
                d.set_item(intern!(py, "reason"), py.None())?;
                d.set_item(intern!(py, "return_at"), py.None())?;
            }
            follow.append(d)?;
        }
        Bound::new(py, FloorResult { changed: true, changes: changes.into_any().unbind(),
                                     follow_ups: follow.into_any().unbind() })
    }
}

#[pymodule]
fn engine_floor(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Floor>()?;
    Ok(())
}
