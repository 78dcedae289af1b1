//! The checks: guest memory against a dump byte for byte, and the guest's counter carrying on.

use std::io::Read;

use crate::vm::{Error, VcpuState, DATA_START, GUEST_CODE, PAGE};

/// The counter value each page holds (its first 8 bytes, little endian).
pub fn page_counters(mem: &[u8]) -> Vec<u64> {
    mem.chunks(PAGE as usize)
        .map(|p| u64::from_le_bytes(p[..8].try_into().expect("pages are 4 KiB")))
        .collect()
}

/// Compares `mem` with the dump read from `dump`, byte for byte; returns the dump's page
/// counters. The error names the first differing byte.
pub fn compare_with_dump(mem: &[u8], dump: &mut impl Read) -> Result<Vec<u64>, Error> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0usize;
    let mut counters = Vec::with_capacity(mem.len() / PAGE as usize);
    loop {
        let n = read_full(dump, &mut buf)?;
        if n == 0 {
            break;
        }
        let Some(ours) = mem.get(at..at + n) else {
            return Err(
                format!("the dump is longer than guest memory ({} bytes)", mem.len()).into(),
            );
        };
        if ours != &buf[..n] {
            let i = ours
                .iter()
                .zip(&buf[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let off = at + i;
            return Err(format!(
                "guest memory differs from the dump at byte {off:#x} (page {}): memory {:#04x}, dump {:#04x}",
                off / PAGE as usize,
                mem[off],
                buf[i]
            )
            .into());
        }
        counters.extend(page_counters(&buf[..n]));
        at += n;
    }
    if at != mem.len() {
        return Err(format!("the dump has {at} bytes, guest memory {} bytes", mem.len()).into());
    }
    Ok(counters)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Index of the first data page and one past the last.
fn data_pages(pages: usize) -> std::ops::Range<usize> {
    (DATA_START / PAGE) as usize..pages
}

/// Where the guest stands: stores completed, and the data position (0 = [`DATA_START`]) of
/// the page it stores to next. Derived from the registers, with `RIP` telling whether the
/// last increment of the counter has been stored yet (see [`crate::vm::GUEST_CODE`]).
pub fn progress(state: &VcpuState, pages: usize) -> Result<(u64, usize), Error> {
    let data = data_pages(pages);
    let len = data.len();
    let (r, c) = (&state.regs, state.counter());
    if r.rbp != DATA_START || r.rsi != (pages as u64) * PAGE {
        return Err(format!(
            "EBP {:#x} / ESI {:#x} are not the guest's start and end of RAM",
            r.rbp, r.rsi
        )
        .into());
    }
    let edi_pos = (state.next_page_addr() / PAGE) as i64 - data.start as i64;
    let (stored, next) = match r.rip {
        // Before the increment, or after the store with EDI already advanced (or reset).
        0x00 | 0x18 | 0x1B | 0x1D | 0x20 => (c, edi_pos),
        // Incremented, not stored yet.
        0x04 | 0x08 => (
            c.checked_sub(1).ok_or("counter 0 after an increment")?,
            edi_pos,
        ),
        // Stored (the high half at 0x0C only differs once the counter passes 2^32), EDI not
        // advanced yet.
        0x0C | 0x11 => (c, edi_pos + 1),
        rip => return Err(format!("RIP {rip:#x} is not an instruction of the guest").into()),
    };
    if !(0..=len as i64).contains(&next) {
        return Err(format!("EDI {:#x} is outside guest RAM", state.next_page_addr()).into());
    }
    Ok((stored, next as usize % len))
}

/// The counter every page must hold when the guest, started with a zero counter on zeroed
/// memory, stands at `state`: the page written `j` stores ago holds `stored + 1 - j`, pages
/// never written hold 0. Page 0 (the code) is reported as 0.
pub fn expected_counters(state: &VcpuState, pages: usize) -> Result<Vec<u64>, Error> {
    let data = data_pages(pages);
    let len = data.len();
    let (stored, next) = progress(state, pages)?;
    let mut out = vec![0u64; pages];
    for q in 0..len {
        let ago = ((next + len - q - 1) % len + 1) as u64;
        out[data.start + q] = if stored >= ago { stored + 1 - ago } else { 0 };
    }
    Ok(out)
}

fn first_unexpected(actual: &[u64], state: &VcpuState) -> Result<(), Error> {
    let expected = expected_counters(state, actual.len())?;
    let data = data_pages(actual.len());
    if let Some(i) = data.clone().find(|&i| actual[i] != expected[i]) {
        return Err(format!(
            "page {i} holds counter {}, but the registers (counter {}, EDI {:#x}, RIP {:#x}) say {}",
            actual[i],
            state.counter(),
            state.next_page_addr(),
            state.regs.rip,
            expected[i]
        )
        .into());
    }
    Ok(())
}

/// Checks that memory and the registers saved with it agree: the code is in place and every
/// page holds exactly the counter value the registers predict ([`expected_counters`]).
pub fn check_consistent(mem: &[u8], counters: &[u64], state: &VcpuState) -> Result<(), Error> {
    if mem.get(..GUEST_CODE.len()) != Some(&GUEST_CODE[..]) {
        return Err("the guest code is not at address 0".into());
    }
    first_unexpected(counters, state)
}

/// How far the guest got after it was resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Continued {
    /// Stores since the resume.
    pub stores: u64,
    /// Pages holding a value above the saved counter.
    pub pages_rewritten: u64,
}

/// Checks that the guest carried on from `saved`: it stored more, no page went backwards from
/// the dump (`before`), and every page holds exactly what the registers `now` predict — which
/// a guest restarted from scratch, or from other registers or memory, does not.
pub fn check_continued(
    before: &[u64],
    saved: &VcpuState,
    after_mem: &[u8],
    now: &VcpuState,
) -> Result<Continued, Error> {
    let after = page_counters(after_mem);
    if after.len() != before.len() {
        return Err("guest memory changed size".into());
    }
    let (s0, _) = progress(saved, before.len())?;
    let (s1, _) = progress(now, after.len())?;
    if s1 <= s0 {
        return Err(format!("the guest did not carry on: {s0} stores at save, {s1} now").into());
    }
    let data = data_pages(after.len());
    if let Some(i) = data.clone().find(|&i| after[i] < before[i]) {
        return Err(format!(
            "page {i} went backwards: {} at save, {} after resume",
            before[i], after[i]
        )
        .into());
    }
    if after_mem.get(..GUEST_CODE.len()) != Some(&GUEST_CODE[..]) {
        return Err("the guest code changed".into());
    }
    first_unexpected(&after, now)?;
    let rewritten = data.clone().filter(|&i| after[i] > s0).count() as u64;
    let expected = (s1 - s0).min(data.len() as u64);
    if rewritten != expected {
        return Err(format!(
            "{rewritten} pages hold values above the saved {s0}, but the guest stored {} times since",
            s1 - s0
        )
        .into());
    }
    Ok(Continued {
        stores: s1 - s0,
        pages_rewritten: rewritten,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(pages: usize) -> Vec<u8> {
        let mut m = vec![0u8; pages * PAGE as usize];
        for (i, p) in m.chunks_mut(PAGE as usize).enumerate().skip(1) {
            p[..8].copy_from_slice(&(i as u64 * 3).to_le_bytes());
            p[100] = i as u8;
        }
        m
    }

    #[test]
    fn identical_dump_passes_and_yields_counters() {
        let m = image(300);
        let counters = compare_with_dump(&m, &mut &m[..]).unwrap();
        assert_eq!(counters.len(), 300);
        assert_eq!(counters[7], 21);
    }

    #[test]
    fn a_single_flipped_byte_fails_the_check() {
        let m = image(300);
        for at in [0, 4095, 4096 * 17 + 100, m.len() - 1] {
            let mut dump = m.clone();
            dump[at] ^= 0x01;
            let err = compare_with_dump(&m, &mut &dump[..])
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("at byte {at:#x}")), "{err}");
        }
    }

    #[test]
    fn a_short_or_long_dump_fails_the_check() {
        let m = image(4);
        assert!(compare_with_dump(&m, &mut &m[..m.len() - 1]).is_err());
        let mut long = m.clone();
        long.push(0);
        assert!(compare_with_dump(&m, &mut &long[..]).is_err());
    }

    /// The guest, interpreted: one instruction of GUEST_CODE per step.
    struct Sim {
        state: VcpuState,
        mem: Vec<u8>,
    }

    impl Sim {
        fn new(pages: usize) -> Self {
            let mut mem = vec![0u8; pages * PAGE as usize];
            mem[..GUEST_CODE.len()].copy_from_slice(&GUEST_CODE);
            let regs = kvm_bindings::kvm_regs {
                rip: 0,
                rdi: DATA_START,
                rbp: DATA_START,
                rsi: mem.len() as u64,
                ..Default::default()
            };
            let state = VcpuState {
                regs,
                sregs: Default::default(),
            };
            Self { state, mem }
        }

        fn step(&mut self) {
            let r = &mut self.state.regs;
            let at = |m: &mut Vec<u8>, a: u64, v: u64| {
                m[a as usize..a as usize + 4].copy_from_slice(&(v as u32).to_le_bytes())
            };
            r.rip = match r.rip {
                0x00 => {
                    r.rbx = (r.rbx + 1) & 0xffff_ffff;
                    if r.rbx == 0 {
                        r.rdx = (r.rdx + 1) & 0xffff_ffff;
                    }
                    0x04
                }
                0x04 => 0x08,
                0x08 => {
                    at(&mut self.mem, r.rdi, r.rbx);
                    0x0C
                }
                0x0C => {
                    at(&mut self.mem, r.rdi + 4, r.rdx);
                    0x11
                }
                0x11 => {
                    r.rdi += PAGE;
                    0x18
                }
                0x18 => 0x1B,
                0x1B if r.rdi < r.rsi => 0x00,
                0x1B => 0x1D,
                0x1D => {
                    r.rdi = r.rbp;
                    0x20
                }
                0x20 => 0x00,
                other => unreachable!("{other:#x}"),
            };
        }
    }

    #[test]
    fn the_registers_predict_every_page_at_every_instruction() {
        let mut sim = Sim::new(6);
        for step in 0..400 {
            let counters = page_counters(&sim.mem);
            check_consistent(&sim.mem, &counters, &sim.state)
                .unwrap_or_else(|e| panic!("step {step}: {e}"));
            sim.step();
        }
    }

    #[test]
    fn a_guest_that_carried_on_passes_and_one_that_restarted_fails() {
        for (run, more) in [(57, 9), (57, 18), (300, 200), (93, 1000)] {
            let mut sim = Sim::new(8);
            (0..run).for_each(|_| sim.step());
            let (saved, before) = (sim.state, page_counters(&sim.mem));
            (0..more).for_each(|_| sim.step());
            let c = check_continued(&before, &saved, &sim.mem, &sim.state)
                .unwrap_or_else(|e| panic!("{run}+{more}: {e}"));
            assert!(c.stores > 0 && c.pages_rewritten > 0, "{run}+{more}: {c:?}");

            // The saved memory, run on from the initial registers for fewer stores than the
            // saved guest had made: pages go backwards. (A restart that outruns the saved
            // guest is indistinguishable from memory alone; the real test runs the guest
            // longer before the save than after the restore.)
            let mut restarted = Sim::new(8);
            restarted.mem.copy_from_slice(&sim.mem);
            for (p, v) in before.iter().enumerate().skip(1) {
                let at = p * PAGE as usize;
                restarted.mem[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            (0..more).for_each(|_| restarted.step());
            assert!(
                more >= run
                    || check_continued(&before, &saved, &restarted.mem, &restarted.state).is_err(),
                "{run}+{more}: a restarted guest passed"
            );

            // One page off by one.
            let mut bad = sim.mem.clone();
            bad[3 * PAGE as usize] ^= 1;
            assert!(check_continued(&before, &saved, &bad, &sim.state).is_err());
            // Registers not restored (the guest's stores not counted) fail too.
            let mut stale = sim.state;
            stale.regs.rbx = saved.regs.rbx;
            assert!(check_continued(&before, &saved, &sim.mem, &stale).is_err());
        }
    }
}
