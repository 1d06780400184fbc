"""A Celler-75-like synthetic corpus, written straight into the store in chunks.

The generative model, chosen so a classifier can learn it but not trivially:

* Tissues (up to 80) each hold a long-tailed set of cell types: a few shared lineages (T cell,
  macrophage, endothelial cell, ...) plus tissue-specific types, with Zipf proportions
  (p_k ~ 1/k^1.5), so a few types cover most cells and many sit under 0.1%.
* Gene programs: every cell expresses a shared housekeeping program; each cell type adds a
  lineage program (shared with its sibling types) and ~40 type-specific markers whose effect is
  modest (2-6x), so sibling types differ only in a handful of genes.
* Disease (up to 75) and donor effects: multiplicative gene-wise factors, a disease changing
  ~100 genes 2-fold, a donor shifting every gene a little (a batch effect).
* Disease-specific rare states (``--disease-states``, off by default so a seed's corpus stays what
  it was): in a tissue, each disease turns 5% of its cells of one common type into a state of that
  type found only under that disease ("macrophage (disease_07 state)": the parent's program plus 12
  state markers). A model trained without the disease never sees the state, which is what
  ``finetune --holdout-diseases`` and ``evaluate --group-by disease`` are for.
* Counts: negative binomial (Poisson-Gamma, dispersion 0.3) around library size x profile; library
  sizes are log-normal so cells carry ~500-3000 non-zero genes.

Deterministic for a seed: dataset k, chunk j draws from ``default_rng([seed, k, j])``, so an
interrupted synth re-run writes exactly the same cells.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from data_store.ingest import AUTO_OPTIMIZE_FRAGMENTS
from data_store.store import CorpusStore, DatasetRecord
from hiceller.errors import InputError

__all__ = ["SynthSpec", "SyntheticCorpus", "synthesize"]

TISSUES = (
    "lung liver kidney heart brain pancreas spleen skin colon stomach blood bone_marrow lymph_node "
    "thymus breast prostate testis ovary uterus placenta adipose muscle esophagus small_intestine "
    "bladder thyroid adrenal_gland retina cornea tonsil trachea nose tongue salivary_gland gallbladder "
    "bile_duct appendix rectum duodenum ileum jejunum cerebellum hippocampus cortex spinal_cord "
    "peripheral_nerve aorta coronary_artery vein lymph_vessel umbilical_cord embryo yolk_sac "
    "fallopian_tube cervix vagina penis epididymis seminal_vesicle kidney_cortex kidney_medulla "
    "renal_pelvis ureter pleura pericardium diaphragm omentum mesentery peritoneum synovium cartilage "
    "bone tendon ligament hair_follicle nail mammary_gland pituitary hypothalamus pineal_gland"
).split()
SHARED_TYPES = (
    "T cell",
    "B cell",
    "NK cell",
    "macrophage",
    "monocyte",
    "dendritic cell",
    "mast cell",
    "endothelial cell",
    "fibroblast",
    "pericyte",
    "smooth muscle cell",
    "plasma cell",
)
N_LINEAGES = 24
STATE_SHARE = 0.05
"""With --disease-states: the share of a tissue's diseased cells drawn as that disease's state."""


@dataclass(frozen=True)
class SynthSpec:
    n_cells: int
    n_genes: int = 20_000
    n_tissues: int = 80
    n_diseases: int = 75
    seed: int = 0
    chunk_cells: int = 4096
    disease_states: bool = False
    """Add disease-specific rare cell states (module docstring)."""

    def __post_init__(self) -> None:
        if self.n_cells < 1:
            raise InputError(f"--cells must be >= 1, got {self.n_cells}")
        if self.n_genes < 200:
            raise InputError(f"--genes must be >= 200, got {self.n_genes}")
        if not 1 <= self.n_tissues <= len(TISSUES):
            raise InputError(f"--tissues must be in [1, {len(TISSUES)}], got {self.n_tissues}")
        if not 1 <= self.n_diseases <= 500:
            raise InputError(f"--diseases must be in [1, 500], got {self.n_diseases}")


class SyntheticCorpus:
    """The fixed world of a seed: genes, cell types and their programs, tissues, diseases."""

    def __init__(self, spec: SynthSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 10_000])
        g = spec.n_genes
        self.genes = [f"SYN{i:05d}" for i in range(g)]
        # Housekeeping: every cell, log-normal abundance; the rest of the genome is lowly expressed.
        base = np.exp(rng.normal(-2.0, 1.5, g))
        hk = rng.choice(g, size=min(g // 10, 2000), replace=False)
        base[hk] *= 30.0
        self.base = base
        self.hk = hk
        lineage_genes = [rng.choice(g, size=max(g // 100, 20), replace=False) for _ in range(N_LINEAGES)]
        self.tissues = TISSUES[: spec.n_tissues]
        self.diseases = ["normal"] + [f"disease_{k:02d}" for k in range(1, spec.n_diseases)]
        self.disease_genes = [rng.choice(g, size=min(100, g // 10), replace=False) for _ in self.diseases]
        self.disease_sign = [rng.choice([-1.0, 1.0], size=len(x)) for x in self.disease_genes]
        # Cell types per tissue: a Zipf-ordered list mixing shared and tissue-specific types.
        self.type_names: list[str] = []
        self.type_lineage: list[int] = []
        self.type_markers: list[np.ndarray] = []
        self.type_effect: list[np.ndarray] = []
        shared_ids = [self._add_type(n, int(rng.integers(N_LINEAGES)), rng) for n in SHARED_TYPES]
        self.tissue_types: list[np.ndarray] = []
        self.tissue_props: list[np.ndarray] = []
        self.lineage_genes = lineage_genes
        for t, name in enumerate(self.tissues):
            n_specific = int(rng.integers(4, 16))
            lin = int(rng.integers(N_LINEAGES))
            specific = [self._add_type(f"{name} type {k + 1}", lin if k % 2 else int(rng.integers(N_LINEAGES)), rng) for k in range(n_specific)]
            n_shared = int(rng.integers(4, len(SHARED_TYPES) + 1))
            types = np.array(specific[:2] + list(rng.choice(shared_ids, n_shared, replace=False)) + specific[2:])
            props = 1.0 / np.arange(1, len(types) + 1) ** 1.5
            self.tissue_types.append(types)
            self.tissue_props.append(props / props.sum())
        tsize = rng.dirichlet(np.full(len(self.tissues), 2.0))
        self.tissue_share = tsize
        # After every draw of the base world, from their own generator: the states add types without
        # changing any other type, so a seed's corpus without --disease-states is unchanged.
        self.state_of: list[dict[int, int]] = [{} for _ in self.tissues]
        if spec.disease_states:
            self._add_disease_states(np.random.default_rng([spec.seed, 60_000]))

    def disease_pool(self, t: int) -> list[int]:
        """The diseases of tissue t's dataset: normal (0) plus one to three others."""
        if len(self.diseases) == 1:
            return [0]
        t_rng = np.random.default_rng([self.spec.seed, t, 30_000])
        return [0] + list(t_rng.choice(np.arange(1, len(self.diseases)), size=min(3, len(self.diseases) - 1), replace=False))

    def _add_disease_states(self, rng: np.random.Generator) -> None:
        """Per tissue and disease, a state of one of the tissue's three commonest types; one state
        type per (parent type, disease), shared by the tissues where it arises."""
        shared: dict[tuple[int, int], int] = {}
        for t in range(len(self.tissues)):
            for d in self.disease_pool(t)[1:]:
                parent = int(self.tissue_types[t][rng.integers(min(3, len(self.tissue_types[t])))])
                if (parent, d) not in shared:
                    shared[(parent, d)] = len(self.type_names)
                    self.type_names.append(f"{self.type_names[parent]} ({self.diseases[d]} state)")
                    self.type_lineage.append(self.type_lineage[parent])
                    state_markers = rng.choice(self.spec.n_genes, size=12, replace=False)
                    self.type_markers.append(np.concatenate([self.type_markers[parent], state_markers]))
                    self.type_effect.append(np.concatenate([self.type_effect[parent], rng.uniform(3.0, 6.0, 12)]))
                self.state_of[t][int(d)] = shared[(parent, d)]

    def _add_type(self, name: str, lineage: int, rng: np.random.Generator) -> int:
        self.type_names.append(name)
        self.type_lineage.append(lineage)
        markers = rng.choice(self.spec.n_genes, size=40, replace=False)
        self.type_markers.append(markers)
        self.type_effect.append(rng.uniform(2.0, 6.0, size=len(markers)))
        return len(self.type_names) - 1

    def type_profile(self, ct: int) -> np.ndarray:
        prof = self.base.copy()
        prof[self.lineage_genes[self.type_lineage[ct]]] *= 8.0
        prof[self.type_markers[ct]] *= self.type_effect[ct] * 4.0
        return prof

    def _draw_group(self, ct, grp, donor, donor_fx, disease, dis_genes, lib, rng):
        """Counts for cells ``grp`` of type ``ct`` as COO (local rows, genes, values).

        Genes touched by a program (housekeeping, lineage, markers, diseases) are drawn densely from
        the negative binomial with donor and disease effects. The thousands of remaining lowly
        expressed genes are drawn by Poisson splitting: a Poisson total per cell, spread over those
        genes by their abundance. This is exact for Poisson counts and keeps the cost per cell
        proportional to its non-zeros instead of to the genome (20k genes).
        """
        g = self.spec.n_genes
        prof = self.type_profile(ct)
        active = np.unique(np.concatenate([self.hk, self.lineage_genes[self.type_lineage[ct]], self.type_markers[ct], dis_genes]))
        low_mask = np.ones(g, dtype=bool)
        low_mask[active] = False
        low = np.flatnonzero(low_mask)
        total = prof.sum()
        mu = prof[active][None, :] * donor_fx[donor[grp]][:, active]
        for d in np.unique(disease[grp]):
            if d == 0:
                continue
            sel = disease[grp] == d
            hit = np.isin(active, self.disease_genes[d])
            factor = np.ones(len(active))
            sign = dict(zip(self.disease_genes[d].tolist(), self.disease_sign[d].tolist()))
            factor[hit] = 2.0 ** np.array([sign[x] for x in active[hit]])
            mu[sel] *= factor
        mu *= (lib[grp] / total)[:, None]
        # Negative binomial as Poisson-Gamma with dispersion 0.3 (shape 1/0.3).
        counts = rng.poisson(mu * rng.gamma(1 / 0.3, 0.3, size=mu.shape))
        r, c = np.nonzero(counts)
        rows, cols, vals = [grp[r]], [active[c]], [counts[r, c].astype(np.float32)]
        q = prof[low]
        n_low = rng.poisson(lib[grp] * q.sum() / total)
        if n_low.sum():
            cell = np.repeat(np.arange(len(grp)), n_low)
            gene = low[np.searchsorted(np.cumsum(q) / q.sum(), rng.random(len(cell)), side="right").clip(max=len(low) - 1)]
            key, cnt = np.unique(cell.astype(np.int64) * g + gene, return_counts=True)
            rows.append(grp[key // g])
            cols.append(key % g)
            vals.append(cnt.astype(np.float32))
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)

    def cells_per_tissue(self) -> np.ndarray:
        rng = np.random.default_rng([self.spec.seed, 20_000])
        n = rng.multinomial(self.spec.n_cells, self.tissue_share)
        return n

    def dataset_id(self, t: int) -> str:
        return f"synth-s{self.spec.seed}-{self.tissues[t]}"

    def generate(self, t: int, n: int, chunk: int) -> tuple[sp.csr_matrix, pd.DataFrame]:
        """Cells [chunk*chunk_cells, +n) of tissue t's dataset."""
        spec = self.spec
        rng = np.random.default_rng([spec.seed, t, chunk])
        types = self.tissue_types[t]
        ct = types[rng.choice(len(types), size=n, p=self.tissue_props[t])]
        n_donors = 2 + t % 7
        donor = rng.integers(0, n_donors, size=n)
        # A tissue's dataset is mostly normal tissue plus one to three diseases.
        dis_pool = self.disease_pool(t)
        dis_p = np.array([0.6] + [0.4 / (len(dis_pool) - 1)] * (len(dis_pool) - 1)) if len(dis_pool) > 1 else np.array([1.0])
        disease = np.array(dis_pool)[rng.choice(len(dis_pool), size=n, p=dis_p)]
        if self.state_of[t]:  # its own generator: the draws below stay those of the corpus without states
            in_state = np.random.default_rng([spec.seed, t, chunk, 50_000]).random(n) < STATE_SHARE
            for d, state in self.state_of[t].items():
                ct[(disease == d) & in_state] = state
        donor_fx = np.exp(np.random.default_rng([spec.seed, t, 40_000]).normal(0.0, 0.25, (n_donors, spec.n_genes)))
        lib = np.exp(rng.normal(np.log(3000.0), 0.5, n))
        rows, cols, vals = [], [], []
        order = np.argsort(ct, kind="stable")
        dis_genes = np.unique(np.concatenate([self.disease_genes[d] for d in dis_pool]))
        # Cells of one type share a profile: draw them together as one block.
        bounds = np.flatnonzero(np.diff(ct[order])) + 1
        for grp in np.split(order, bounds):
            r, c, v = self._draw_group(int(ct[grp[0]]), grp, donor, donor_fx, disease, dis_genes, lib, rng)
            rows.append(r)
            cols.append(c)
            vals.append(v)
        m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, spec.n_genes))
        m.sort_indices()
        obs = pd.DataFrame(
            {
                "obs_id": [f"{self.dataset_id(t)}-{chunk}-{i}" for i in range(n)],
                "cell_type": np.array(self.type_names, dtype=object)[ct],
                "tissue": self.tissues[t],
                "disease": np.array(self.diseases, dtype=object)[disease],
                "donor_id": [f"{self.tissues[t]}-donor{d}" for d in donor],
                "dataset_id": self.dataset_id(t),
            }
        )
        return m, obs


def synthesize(
    store_uri: str,
    spec: SynthSpec,
    progress_factory: Callable[[str, int], Callable[[int], None]] | None = None,
) -> list[DatasetRecord]:
    """Write the corpus as one dataset per tissue, in tissue order (as real corpora are ingested).

    Kept as one function (61 lines): reserve, write chunks, count, finish is the store's
    crash-safe protocol for one dataset, and reads best in one place."""
    corpus = SyntheticCorpus(spec)
    t0_ms = int(time.time() * 1000) - 1
    store = CorpusStore.open_or_create(store_uri)
    col_ids, n_new = store.extend_vocabulary(corpus.genes)
    monotone = bool(np.all(np.diff(col_ids) > 0))
    sizes = corpus.cells_per_tissue()
    bar = progress_factory("synth", spec.n_cells) if progress_factory else None
    done = []
    for t, n in enumerate(sizes):
        if n == 0:
            continue
        rec = store.datasets.get(corpus.dataset_id(t))
        if rec is not None and rec.status == "complete":
            if bar:
                bar(int(n))
            continue
        counts: dict[str, dict[str, int]] = {}
        record = DatasetRecord(
            dataset_id=corpus.dataset_id(t),
            start=0,
            stop=int(n),
            status="writing",
            kind="counts",
            source=f"hiceller synth seed={spec.seed} genes={spec.n_genes} tissues={spec.n_tissues} diseases={spec.n_diseases}"
            + (" disease-states" if spec.disease_states else ""),
            labeled=True,
            tissue=corpus.tissues[t],
            n_genes=spec.n_genes,
            new_genes=n_new if not done else 0,
            fingerprint=f"synth-{spec.seed}-{spec.n_cells}-{spec.n_genes}-{spec.n_tissues}-{spec.n_diseases}"
            + ("-states" if spec.disease_states else ""),
        )
        record = store.reserve_dataset(record)
        for j, a in enumerate(range(0, int(n), spec.chunk_cells)):
            m, obs = corpus.generate(t, min(spec.chunk_cells, int(n) - a), j)
            m.indices = col_ids[m.indices]
            if not monotone:
                m.has_sorted_indices = False
                m.sort_indices()
            for c in ("cell_type", "tissue", "disease", "donor_id"):
                for k, v in obs[c].value_counts().items():
                    counts.setdefault(c, {})[str(k)] = counts.setdefault(c, {}).get(str(k), 0) + int(v)
            store.write_chunk(record, a, m.indptr, m.indices, m.data, obs)
            if bar:
                bar(m.shape[0])
        record.counts = counts
        store.finish_dataset(record)
        done.append(record)
    # Each dataset left a fragment per chunk in X and obs and two in the registry: merge what this
    # run wrote, as an ingest does (data_store/optimize.py).
    if 2 * len(done) + sum(-(-r.n_cells // spec.chunk_cells) for r in done) >= AUTO_OPTIMIZE_FRAGMENTS:
        from data_store.optimize import optimize_store

        optimize_store(store_uri, since_ms=t0_ms)
    return done
