//! `DeviceMap`: the accelerate-compatible answer, an ordered map from module-or-tensor prefix to device.

use std::collections::BTreeMap;
use std::path::Path;

use crate::budget::Device;
use crate::error::{Error, Result};

/// An ordered map from a module or tensor name (`""` = the whole model) to a device.
///
/// Serialised exactly like accelerate's dict: JSON integers for GPUs, `"cpu"`, `"disk"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMap {
    entries: Vec<(String, Device)>,
}

impl DeviceMap {
    /// An empty map.
    pub fn new() -> DeviceMap {
        DeviceMap::default()
    }

    /// The whole model on one device: `{"": device}`.
    pub fn whole(device: Device) -> DeviceMap {
        DeviceMap {
            entries: vec![(String::new(), device)],
        }
    }

    /// Append an entry, replacing an existing one with the same key.
    pub fn insert(&mut self, key: impl Into<String>, device: Device) {
        let key = key.into();
        if let Some(e) = self.entries.iter_mut().find(|(k, _)| *k == key) {
            e.1 = device;
        } else {
            self.entries.push((key, device));
        }
    }

    /// Append an entry without checking for an existing key (the caller guarantees uniqueness);
    /// linear-time construction for planners that emit many keys.
    pub fn push_unchecked(&mut self, key: String, device: Device) {
        self.entries.push((key, device));
    }

    /// Entries in order.
    pub fn entries(&self) -> &[(String, Device)] {
        &self.entries
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The device of an exact key.
    pub fn get(&self, key: &str) -> Option<Device> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, d)| *d)
    }

    /// The device of `name` by its longest matching key (`""`, the name itself, or a dotted prefix).
    pub fn resolve(&self, name: &str) -> Option<Device> {
        let mut best: Option<(usize, Device)> = None;
        for (k, d) in &self.entries {
            if covers(k, name) && best.is_none_or(|(len, _)| k.len() > len) {
                best = Some((k.len(), *d));
            }
        }
        best.map(|(_, d)| d)
    }

    /// The entries as an unordered dict, for comparisons.
    pub fn as_sorted(&self) -> BTreeMap<&str, Device> {
        self.entries.iter().map(|(k, d)| (k.as_str(), *d)).collect()
    }

    /// Merge keys that share a device, as accelerate's `clean_device_map` does: wherever every key
    /// under a module prefix (two or more) has the same device, they become one key for the module.
    /// The content equals accelerate's; the order is deterministic (a merged key takes the place of
    /// its first member), whereas accelerate's depends on Python's hash seed.
    pub fn clean(&self) -> DeviceMap {
        // Work on keys with their original positions.
        let items: Vec<(usize, &str, Device)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, d))| (i, k.as_str(), *d))
            .collect();
        let mut out: Vec<(usize, String, Device)> = Vec::with_capacity(items.len());
        clean_rec("", &items, &mut out);
        out.sort_by_key(|(i, _, _)| *i);
        DeviceMap {
            entries: out.into_iter().map(|(_, k, d)| (k, d)).collect(),
        }
    }

    /// Serialise as accelerate's JSON dict.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, d) in &self.entries {
            m.insert(k.clone(), d.to_json());
        }
        serde_json::Value::Object(m)
    }

    /// Parse a JSON dict; GPU values may be integers, `"0"` or `"cuda:0"`. Duplicate keys are errors.
    pub fn from_json_str(text: &str) -> Result<DeviceMap> {
        let pairs: OrderedPairs = serde_json::from_str(text)
            .map_err(|e| Error::DeviceMap(format!("not a JSON object of name -> device: {e}")))?;
        let mut map = DeviceMap::new();
        // A set, not `map.get`: a linear lookup per key made a 170k-key map take minutes.
        let mut seen = std::collections::HashSet::with_capacity(pairs.0.len());
        for (k, v) in pairs.0 {
            if !seen.insert(k.clone()) {
                return Err(Error::DeviceMap(format!("key {k:?} appears twice")));
            }
            let d =
                Device::from_json(&v).map_err(|e| Error::DeviceMap(format!("key {k:?}: {e}")))?;
            map.entries.push((k, d));
        }
        Ok(map)
    }

    /// Read a JSON map from a file.
    pub fn read(path: &Path) -> Result<DeviceMap> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        DeviceMap::from_json_str(&text).map_err(|e| match e {
            Error::DeviceMap(reason) => Error::json(path, reason),
            other => other,
        })
    }
}

impl DeviceMap {
    /// The smallest map giving every tensor the device in `devices` (indexed by tensor id): a module
    /// whose tensors all share a device becomes one key, otherwise its direct tensors get their own
    /// keys and its children are visited. Modules without tensors take the device of the tensor
    /// before them in registration order (the first tensor's device at the start), so every module
    /// is mapped, as in Hugging Face's maps.
    pub fn from_tensor_devices(model: &crate::model::Model, devices: &[Device]) -> DeviceMap {
        use crate::model::ModuleId;
        let n = model.modules().len();
        // Per module: Some(device) if every tensor under it has that device, None if mixed or empty.
        let mut uniform: Vec<Option<Option<Device>>> = vec![None; n]; // None = no tensors yet
        let mut mixed = vec![false; n];
        for (t, tensor) in model.tensors().iter().enumerate() {
            let mut cur = Some(tensor.module);
            while let Some(m) = cur {
                match uniform[m] {
                    None => uniform[m] = Some(Some(devices[t])),
                    Some(Some(d)) if d != devices[t] => mixed[m] = true,
                    _ => {}
                }
                cur = model.module(m).parent;
            }
        }
        let first = devices.first().copied().unwrap_or(Device::Cpu);
        let mut map = DeviceMap::new();
        let mut last = first;
        fn visit(
            model: &crate::model::Model,
            m: ModuleId,
            devices: &[Device],
            uniform: &[Option<Option<Device>>],
            mixed: &[bool],
            last: &mut Device,
            map: &mut DeviceMap,
        ) {
            let module = model.module(m);
            match uniform[m] {
                None => {
                    if m != 0 {
                        map.push_unchecked(module.name.clone(), *last);
                    }
                    return;
                }
                Some(Some(d)) if !mixed[m] => {
                    map.push_unchecked(module.name.clone(), d);
                    *last = d;
                    return;
                }
                _ => {}
            }
            for &t in module.params.iter().chain(&module.buffers) {
                map.push_unchecked(model.tensor(t).name.clone(), devices[t]);
                *last = devices[t];
            }
            for &c in &module.children {
                visit(model, c, devices, uniform, mixed, last, map);
            }
        }
        visit(model, 0, devices, &uniform, &mixed, &mut last, &mut map);
        map
    }
}

/// Whether map key `key` covers the module or tensor `name`.
pub fn covers(key: &str, name: &str) -> bool {
    key.is_empty()
        || name == key
        || (name.len() > key.len() && name.starts_with(key) && name.as_bytes()[key.len()] == b'.')
}

/// A map key with its original position, for `clean`.
type Keyed<'a> = (usize, &'a str, Device);

fn clean_rec(
    module: &str,
    items: &[(usize, &str, Device)],
    out: &mut Vec<(usize, String, Device)>,
) {
    // `items` are the keys strictly under `module` (or all keys at the root), plus possibly `module`
    // itself, which accelerate's prefix test does not count as "under".
    let (exact, under): (Vec<_>, Vec<_>) = items.iter().partition(|(_, k, _)| *k == module);
    for &&(i, k, d) in &exact {
        out.push((i, k.to_string(), d));
    }
    if under.len() > 1 && under.iter().all(|(_, _, d)| *d == under[0].2) {
        let first = under.iter().map(|(i, _, _)| *i).min().unwrap_or(0);
        out.push((first, module.to_string(), under[0].2));
        return;
    }
    // Group by the next name component, keeping first-seen order.
    let skip = if module.is_empty() {
        0
    } else {
        module.len() + 1
    };
    let mut groups: Vec<(String, Vec<Keyed<'_>>)> = Vec::new();
    // Index of each child's group: a linear search per key was quadratic in a module's children.
    let mut group_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for &&(i, k, d) in &under {
        let rest = &k[skip..];
        let head = rest.split('.').next().unwrap_or(rest);
        match group_of.get(head) {
            Some(&g) => groups[g].1.push((i, k, d)),
            None => {
                let child = if module.is_empty() {
                    head.to_string()
                } else {
                    format!("{module}.{head}")
                };
                group_of.insert(head, groups.len());
                groups.push((child, vec![(i, k, d)]));
            }
        }
    }
    for (child, group) in groups {
        clean_rec(&child, &group, out);
    }
}

struct OrderedPairs(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for OrderedPairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedPairs;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<OrderedPairs, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    out.push((k, map.next_value()?));
                }
                Ok(OrderedPairs(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, Device)]) -> DeviceMap {
        let mut m = DeviceMap::new();
        for (k, d) in pairs {
            m.insert(*k, *d);
        }
        m
    }

    #[test]
    fn clean_matches_accelerates_examples() {
        use Device::*;
        let m = map(&[("a", Gpu(0)), ("b", Gpu(0)), ("c", Gpu(0))]).clean();
        assert_eq!(m, DeviceMap::whole(Gpu(0)));
        let m = map(&[
            ("a.x", Gpu(0)),
            ("a.y", Gpu(0)),
            ("b.x", Gpu(1)),
            ("b.y", Gpu(1)),
            ("c", Gpu(1)),
        ])
        .clean();
        assert_eq!(m, map(&[("a", Gpu(0)), ("b", Gpu(1)), ("c", Gpu(1))]));
        // A single key is never renamed to its parent.
        let m = map(&[("a.b.c", Gpu(0)), ("d", Gpu(1))]).clean();
        assert_eq!(m, map(&[("a.b.c", Gpu(0)), ("d", Gpu(1))]));
        // Prefix test is by dotted component: layers.1 does not absorb layers.10.
        let m = map(&[
            ("m.layers.1.a", Gpu(0)),
            ("m.layers.1.b", Gpu(0)),
            ("m.layers.10", Gpu(1)),
        ])
        .clean();
        assert_eq!(m, map(&[("m.layers.1", Gpu(0)), ("m.layers.10", Gpu(1))]));
    }

    #[test]
    fn json_round_trip_and_resolution() {
        let m = DeviceMap::from_json_str(
            r#"{"model.embed": 0, "model.layers": "cuda:1", "lm_head": "cpu", "x": "disk"}"#,
        )
        .unwrap();
        assert_eq!(m.get("model.layers"), Some(Device::Gpu(1)));
        assert_eq!(
            m.to_json().to_string(),
            r#"{"model.embed":0,"model.layers":1,"lm_head":"cpu","x":"disk"}"#
        );
        assert_eq!(m.resolve("model.layers.3.w"), Some(Device::Gpu(1)));
        assert_eq!(m.resolve("model.layersX"), None);
        let e = DeviceMap::from_json_str(r#"{"a": 0, "a": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"a\""), "{e}");
        let e = DeviceMap::from_json_str(r#"{"a": "gpu"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"gpu\""), "{e}");
    }
}
