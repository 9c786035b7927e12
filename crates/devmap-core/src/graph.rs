//! The model as a petgraph DAG: containment edges parent → child between modules, and data-flow
//! edges between consecutive placement units in execution (registration) order.
//!
//! A placement unit is a no-split module, or, outside no-split modules, a module's direct tensors
//! (a `Linear` with its bias). Units are what strategies move between devices.

use petgraph::graph::{DiGraph, NodeIndex};

use crate::dtype::DType;
use crate::model::{Model, ModuleId, TensorId};

/// A placement unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The module the unit belongs to.
    pub module: ModuleId,
    /// Whether the unit is the whole subtree of `module` (a no-split block or a childless module),
    /// as opposed to only its direct tensors.
    pub whole: bool,
    /// The tensors in the unit.
    pub tensors: Vec<TensorId>,
}

/// An edge of the model graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Edge {
    /// Parent module contains child module.
    Contains,
    /// Activations flow from one unit to the next.
    DataFlow {
        /// Bytes of activation per token crossing the edge (hidden size × activation dtype bytes).
        bytes_per_token: u64,
    },
}

/// The module DAG with its units.
#[derive(Debug, Clone)]
pub struct ModelGraph {
    /// Nodes are module ids; edges are [`Edge`]s.
    pub graph: DiGraph<ModuleId, Edge>,
    /// Node of each module (indexed by module id).
    pub nodes: Vec<NodeIndex>,
    /// Placement units in execution order.
    pub units: Vec<Unit>,
}

/// Split the model into placement units, in execution order.
pub fn units(model: &Model) -> Vec<Unit> {
    fn collect(model: &Model, id: ModuleId, out: &mut Vec<Unit>) {
        let m = model.module(id);
        if m.no_split || m.children.is_empty() {
            let mut tensors = Vec::new();
            let mut stack = vec![id];
            while let Some(x) = stack.pop() {
                let mm = model.module(x);
                tensors.extend(mm.params.iter().chain(&mm.buffers));
                stack.extend(mm.children.iter().rev());
            }
            if !tensors.is_empty() {
                tensors.sort_unstable();
                out.push(Unit {
                    module: id,
                    whole: true,
                    tensors,
                });
            }
            return;
        }
        let direct: Vec<TensorId> = m.params.iter().chain(&m.buffers).copied().collect();
        if !direct.is_empty() {
            out.push(Unit {
                module: id,
                whole: false,
                tensors: direct,
            });
        }
        for &c in &m.children {
            collect(model, c, out);
        }
    }
    let mut out = Vec::new();
    collect(model, 0, &mut out);
    out
}

impl ModelGraph {
    /// Build the graph; `activation` is the dtype of activations (defaults to the model's first float dtype).
    pub fn build(model: &Model, activation: Option<DType>) -> ModelGraph {
        let mut graph = DiGraph::with_capacity(model.modules().len(), model.modules().len() * 2);
        let nodes: Vec<NodeIndex> = (0..model.modules().len())
            .map(|id| graph.add_node(id))
            .collect();
        for (id, m) in model.modules().iter().enumerate() {
            for &c in &m.children {
                graph.add_edge(nodes[id], nodes[c], Edge::Contains);
            }
        }
        let act = activation
            .or_else(|| {
                model
                    .tensors()
                    .iter()
                    .map(|t| t.dtype)
                    .find(|d| d.is_float())
            })
            .unwrap_or(DType::F16);
        // Saturating: `hidden_size` comes from a manifest or config.json.
        let bytes_per_token = model
            .hidden_size
            .unwrap_or(0)
            .saturating_mul(act.size_bytes());
        let units = units(model);
        for pair in units.windows(2) {
            if pair[0].module != pair[1].module {
                graph.add_edge(
                    nodes[pair[0].module],
                    nodes[pair[1].module],
                    Edge::DataFlow { bytes_per_token },
                );
            }
        }
        ModelGraph {
            graph,
            nodes,
            units,
        }
    }

    /// Whether the graph (containment plus data flow) is acyclic.
    pub fn is_acyclic(&self) -> bool {
        !petgraph::algo::is_cyclic_directed(&self.graph)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelBuilder;

    #[test]
    fn units_follow_no_split_and_leaves() {
        let m = ModelBuilder::new("t")
            .module("embed", "Embedding")
            .module("layers", "ModuleList")
            .module("layers.0", "Block")
            .module("layers.0.a", "Linear")
            .module("layers.1", "Block")
            .module("layers.1.a", "Linear")
            .module("head", "Linear")
            .param("embed.weight", DType::F16, &[4, 2])
            .param("layers.0.a.weight", DType::F16, &[2, 2])
            .param("layers.0.scale", DType::F16, &[2])
            .param("layers.1.a.weight", DType::F16, &[2, 2])
            .param("layers.1.scale", DType::F16, &[2])
            .param("head.weight", DType::F16, &[4, 2])
            .no_split_classes(vec!["Block".into()])
            .hidden_size(Some(2))
            .build()
            .unwrap();
        let g = ModelGraph::build(&m, None);
        let names: Vec<&str> = g
            .units
            .iter()
            .map(|u| m.module(u.module).name.as_str())
            .collect();
        assert_eq!(names, vec!["embed", "layers.0", "layers.1", "head"]);
        assert_eq!(g.units[1].tensors.len(), 2);
        assert!(g.is_acyclic());
        let flows = g
            .graph
            .edge_weights()
            .filter(|e| matches!(e, Edge::DataFlow { bytes_per_token: 4 }))
            .count();
        assert_eq!(flows, 3);
    }
}
