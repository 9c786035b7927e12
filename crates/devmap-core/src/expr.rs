//! The registry's expression grammar: numbers, dotted config paths, `+ - * /`, `//` (floor
//! division), parentheses,
//! computed in floating point and truncated to an integer at the end (config fields such as
//! `partial_rotary_factor` are fractions). Used for tensor shapes and repeat counts that a
//! checkpoint does not say.
//!
//! Values are looked up through a [`Lookup`] (config.json, then the class defaults, then derived
//! expressions): parsing never touches the config, so the grammar is checked on its own.

/// Most nested parentheses (and derived-path indirections) an expression may use: registry
/// expressions are short; the bound keeps a hostile file from exhausting the stack.
const MAX_DEPTH: usize = 32;

/// A value source for config paths.
pub trait Lookup {
    /// The number at `path`, `Ok(None)` when the config has no value there, `Err` with a reason
    /// when the path resolves to something that is not a number (or a derived expression fails).
    fn value(&self, path: &str, depth: usize) -> Result<Option<f64>, String>;
}

/// Evaluate `text` with config paths resolved by `lookup`, truncated toward zero; `depth` counts
/// derived indirections. Errors name the expression and what failed.
pub fn eval(text: &str, lookup: &dyn Lookup, depth: usize) -> Result<i64, String> {
    let v = eval_f64(text, lookup, depth)?;
    // Beyond 2^53 a float no longer holds every integer: no tensor dimension gets there.
    if v.abs() >= 9.0e15 {
        return Err(format!("expression {text:?}: {v} is out of range"));
    }
    Ok(v.trunc() as i64)
}

/// Evaluate `text` without truncating (a derived path keeps its fraction).
pub fn eval_f64(text: &str, lookup: &dyn Lookup, depth: usize) -> Result<f64, String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "expression {text:?}: more than {MAX_DEPTH} nested derived paths"
        ));
    }
    let mut p = Parser {
        src: text,
        pos: 0,
        lookup,
        depth,
    };
    let v = p.sum(0).map_err(|e| format!("expression {text:?}: {e}"))?;
    p.skip_ws();
    if p.pos != text.len() {
        return Err(format!(
            "expression {text:?}: unexpected {:?} at byte {}",
            &text[p.pos..],
            p.pos
        ));
    }
    if !v.is_finite() {
        return Err(format!("expression {text:?}: the result is not finite"));
    }
    Ok(v)
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    lookup: &'a dyn Lookup,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn skip_ws(&mut self) {
        while self.src[self.pos..].starts_with(' ') {
            self.pos += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.src.as_bytes().get(self.pos).copied()
    }
    fn sum(&mut self, nest: usize) -> Result<f64, String> {
        let mut v = self.product(nest)?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.pos += 1;
            let r = self.product(nest)?;
            v = if op == b'+' { v + r } else { v - r };
        }
        Ok(v)
    }
    fn product(&mut self, nest: usize) -> Result<f64, String> {
        let mut v = self.atom(nest)?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.pos += 1;
            // `//` is floor division (a patch grid of 384 px in 14 px patches has 27 per side).
            let floor = op == b'/' && self.src.as_bytes().get(self.pos) == Some(&b'/');
            if floor {
                self.pos += 1;
            }
            let r = self.atom(nest)?;
            v = if op == b'*' {
                v * r
            } else if r == 0.0 {
                return Err("division by zero".into());
            } else if floor {
                (v / r).floor()
            } else {
                v / r
            };
        }
        Ok(v)
    }
    fn atom(&mut self, nest: usize) -> Result<f64, String> {
        match self.peek() {
            Some(b'(') => {
                if nest >= MAX_DEPTH {
                    return Err(format!("more than {MAX_DEPTH} nested parentheses"));
                }
                self.pos += 1;
                let v = self.sum(nest + 1)?;
                if self.peek() != Some(b')') {
                    return Err(format!("missing ')' at byte {}", self.pos));
                }
                self.pos += 1;
                Ok(v)
            }
            Some(b'-') => {
                self.pos += 1;
                Ok(-self.atom(nest)?)
            }
            Some(c) if c.is_ascii_digit() => {
                let digits = self.take(|b| b.is_ascii_digit() || b == b'.');
                digits
                    .parse::<f64>()
                    .map_err(|_| format!("{digits:?} is not a number"))
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let path = self.take(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
                self.lookup
                    .value(path, self.depth)?
                    .ok_or_else(|| format!("config path {path:?} has no value"))
            }
            Some(_) => Err(format!(
                "unexpected {:?} at byte {}",
                &self.src[self.pos..],
                self.pos
            )),
            None => Err("ends where a value was expected".into()),
        }
    }
    fn take(&mut self, keep: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.src.as_bytes().get(self.pos).is_some_and(|&b| keep(b)) {
            self.pos += 1;
        }
        &self.src[start..self.pos]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Map(HashMap<&'static str, f64>);
    impl Lookup for Map {
        fn value(&self, path: &str, _: usize) -> Result<Option<f64>, String> {
            Ok(self.0.get(path).copied())
        }
    }

    fn cfg() -> Map {
        Map(HashMap::from([
            ("hidden_size", 64.0),
            ("num_attention_heads", 4.0),
            ("text_config.intermediate_size", 172.0),
            ("rope_parameters.partial_rotary_factor", 0.25),
        ]))
    }

    #[test]
    fn arithmetic_and_paths() {
        let c = cfg();
        assert_eq!(eval("hidden_size/num_attention_heads/2", &c, 0), Ok(8));
        assert_eq!(
            eval("2 * (text_config.intermediate_size + 4)", &c, 0),
            Ok(352)
        );
        // Floating point, truncated at the end only (as the generator computes).
        assert_eq!(eval("7/2", &c, 0), Ok(3));
        assert_eq!(eval("7/2*2", &c, 0), Ok(7));
        assert_eq!(eval("-7/2", &c, 0), Ok(-3));
        assert_eq!(
            eval(
                "hidden_size/num_attention_heads*rope_parameters.partial_rotary_factor/2",
                &c,
                0
            ),
            Ok(2)
        );
        assert_eq!(eval("1.5*4", &c, 0), Ok(6));
        assert_eq!(eval("10-2-3", &c, 0), Ok(5));
        assert_eq!(eval("42", &c, 0), Ok(42));
    }

    #[test]
    fn floor_division_floors_each_step() {
        let c = cfg();
        // 64 // 14 = 4 per side: 16, where 64/14 squared would truncate to 20.
        assert_eq!(eval("(hidden_size//14)*(hidden_size//14)", &c, 0), Ok(16));
        assert_eq!(eval("(hidden_size/14)*(hidden_size/14)", &c, 0), Ok(20));
        assert_eq!(eval("7//2*2", &c, 0), Ok(6));
        assert_eq!(eval("-7//2", &c, 0), Ok(-4));
        assert!(eval("hidden_size // 0", &c, 0).is_err());
    }

    #[test]
    fn errors_name_the_expression() {
        let c = cfg();
        for (text, want) in [
            ("hidden_size/", "ends where"),
            ("vocab_size", "\"vocab_size\" has no value"),
            ("(1+2", "missing ')'"),
            ("1 $ 2", "unexpected"),
            ("4/0", "division by zero"),
            ("1.2.3", "not a number"),
            ("99999999999999999999", "out of range"),
        ] {
            let e = eval(text, &c, 0).unwrap_err();
            assert!(e.contains(text) && e.contains(want), "{text}: {e}");
        }
        let deep = "(".repeat(100) + "1" + &")".repeat(100);
        assert!(eval(&deep, &c, 0).unwrap_err().contains("nested"));
    }
}
