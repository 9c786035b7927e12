//! Helpers the data-driven parity tests share.

use devmap_core::DeviceMap;

/// `None` when the maps are equal; else up to six differing keys, `key: want W got G` for keys of
/// `want` and `key: extra D` for keys only `got` has, joined with `; `.
pub fn map_diff(got: &DeviceMap, want: &DeviceMap) -> Option<String> {
    let (got, want) = (got.as_sorted(), want.as_sorted());
    if got == want {
        return None;
    }
    let diff: Vec<String> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: want {v} got {:?}", got.get(k)))
        .chain(
            got.iter()
                .filter(|(k, _)| !want.contains_key(*k))
                .map(|(k, v)| format!("{k}: extra {v}")),
        )
        .take(6)
        .collect();
    Some(diff.join("; "))
}
