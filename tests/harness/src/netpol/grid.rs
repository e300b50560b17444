//! Reachability grids (upstream's `TruthTable`): rows are the sources, columns the
//! destinations, `.` = reachable, `X` = not; the diagonal (a pod to itself) is not probed.

use anyhow::{bail, Result};
use std::fmt;

/// One protocol/port matrix between the model's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    /// Pod keys (`x/a`), the order of rows and columns.
    pub pods: Vec<String>,
    /// `cells[from][to]`: Some(reachable), None on the diagonal (or not probed).
    pub cells: Vec<Vec<Option<bool>>>,
}

impl Grid {
    /// A grid with every cell unknown.
    pub fn empty(pods: &[String]) -> Grid {
        Grid {
            pods: pods.to_vec(),
            cells: vec![vec![None; pods.len()]; pods.len()],
        }
    }

    /// Every off-diagonal cell set to `ok`.
    pub fn all(pods: &[String], ok: bool) -> Grid {
        let mut g = Grid::empty(pods);
        for (i, row) in g.cells.iter_mut().enumerate() {
            for (j, c) in row.iter_mut().enumerate() {
                if i != j {
                    *c = Some(ok);
                }
            }
        }
        g
    }

    /// From rows of `.`/`X` characters (one string per source pod); the diagonal character is
    /// ignored (never probed).
    pub fn from_rows(pods: &[String], rows: &[String]) -> Result<Grid> {
        if rows.len() != pods.len() {
            bail!(
                "grid has {} rows, the model {} pods",
                rows.len(),
                pods.len()
            );
        }
        let mut g = Grid::empty(pods);
        for (i, r) in rows.iter().enumerate() {
            let chars: Vec<char> = r.chars().collect();
            if chars.len() != pods.len() {
                bail!(
                    "grid row {i} {r:?} has {} cells, want {}",
                    chars.len(),
                    pods.len()
                );
            }
            for (j, ch) in chars.into_iter().enumerate() {
                let v = match ch {
                    '.' => true,
                    'X' | 'x' => false,
                    _ => bail!("grid row {i} {r:?}: cell {j} is {ch:?}, want '.' or 'X'"),
                };
                if i != j {
                    g.cells[i][j] = Some(v);
                }
            }
        }
        Ok(g)
    }

    /// Cells compared: both known and off the diagonal.
    pub fn compared(&self, other: &Grid) -> usize {
        self.pairs(other).count()
    }

    /// (from, to) of every cell where both grids are known and differ.
    pub fn mismatches(&self, expected: &Grid) -> Vec<(usize, usize)> {
        self.pairs(expected)
            .filter(|&(i, j)| self.cells[i][j] != expected.cells[i][j])
            .collect()
    }

    fn pairs<'a>(&'a self, other: &'a Grid) -> impl Iterator<Item = (usize, usize)> + 'a {
        let n = self.pods.len().min(other.pods.len());
        (0..n)
            .flat_map(move |i| (0..n).map(move |j| (i, j)))
            .filter(move |&(i, j)| {
                i != j
                    && self.cells[i].get(j).copied().flatten().is_some()
                    && other
                        .cells
                        .get(i)
                        .and_then(|r| r.get(j))
                        .copied()
                        .flatten()
                        .is_some()
            })
    }

    /// Reachable cells.
    pub fn reachable(&self) -> usize {
        self.cells
            .iter()
            .flatten()
            .filter(|c| **c == Some(true))
            .count()
    }

    /// Rows as `.`/`X` strings (`#` on the diagonal / unknown), the format of cases.json.
    pub fn rows(&self) -> Vec<String> {
        self.cells
            .iter()
            .map(|r| r.iter().map(|c| cell_char(*c)).collect())
            .collect()
    }

    /// Upstream-style table of this (observed) grid against `expected`: a mismatching cell is
    /// printed with a `!` after it (`.!` = reachable but should not be, `X!` = blocked but
    /// should be reachable).
    pub fn pretty_against(&self, expected: Option<&Grid>) -> String {
        let w = self.pods.iter().map(|p| p.len()).max().unwrap_or(3).max(3) + 1;
        let mut s = format!("{:<w$}", "-");
        for p in &self.pods {
            s.push_str(&format!("{p:<w$}"));
        }
        s.push('\n');
        for (i, from) in self.pods.iter().enumerate() {
            s.push_str(&format!("{from:<w$}"));
            for j in 0..self.pods.len() {
                let c = self.cells[i][j];
                let bad = expected
                    .and_then(|e| e.cells.get(i).and_then(|r| r.get(j)).copied().flatten())
                    .is_some_and(|e| c.is_some() && c != Some(e));
                let cell = format!("{}{}", cell_char(c), if bad { "!" } else { "" });
                s.push_str(&format!("{cell:<w$}"));
            }
            s.push('\n');
        }
        s
    }
}

fn cell_char(c: Option<bool>) -> char {
    match c {
        Some(true) => '.',
        Some(false) => 'X',
        None => '#',
    }
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pretty_against(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<String> {
        ["x/a", "x/b", "y/a"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn rows_roundtrip_and_mismatches() {
        let p = pods();
        let rows: Vec<String> = ["..X", "X..", "..."]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let g = Grid::from_rows(&p, &rows).expect("grid");
        assert_eq!(g.rows(), vec!["#.X", "X#.", "..#"]);
        let all = Grid::all(&p, true);
        assert_eq!(all.compared(&g), 6);
        assert_eq!(all.mismatches(&g), vec![(0, 2), (1, 0)]);
        let t = all.pretty_against(Some(&g));
        assert!(t.contains(".!"), "{t}");
        assert!(Grid::from_rows(&p, &rows[..2]).is_err());
        assert!(Grid::from_rows(&p, &["..?".into(), "...".into(), "...".into()]).is_err());
    }
}
