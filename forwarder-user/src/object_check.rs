//! Checks of the compiled eBPF object against what older verifiers refuse
//! outright, run as unit tests so a build that would not load on a user's
//! kernel fails here, not on their router.
//!
//! Kernels before 6.4 walk every program's control flow before verifying
//! it, and refuse a loop closed by falling through from a plain
//! instruction into the loop's head ("back-edge from insn X to Y"): only a
//! jump may close a loop. LLVM lays some loops out that way.
//!
//! Kernels before 5.13 also count a called subprogram's stack on top of
//! its caller's, each rounded up to 32 bytes, against the 512 bytes one
//! program may use: with the datapath's deep frames, any call of one
//! (LLVM calls a memset subprogram for a zeroed struct) is refused there.

#[cfg(test)]
mod tests {
    use crate::EBPF_OBJECT;

    /// What the walk needs of an instruction: its opcode and jump offset.
    #[derive(Clone, Copy)]
    struct Insn {
        code: u8,
        off: i16,
    }

    const BPF_JMP: u8 = 0x05;
    const BPF_JMP32: u8 = 0x06;
    const BPF_JA: u8 = 0x00;
    const BPF_CALL: u8 = 0x80;
    const BPF_EXIT: u8 = 0x90;

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Mark {
        Unseen,
        /// On the depth-first path: an edge into it closes a loop.
        OnPath,
        Done,
    }

    /// The edges out of instruction `t`: (target, whether that edge may
    /// close a loop), as the old verifiers' check_cfg() sees them.
    fn edges(insns: &[Insn], t: usize) -> Vec<(usize, bool)> {
        let insn = &insns[t];
        let class = insn.code & 0x07;
        if class != BPF_JMP && class != BPF_JMP32 {
            return vec![(t + 1, false)];
        }
        let target = (t as i64 + 1 + i64::from(insn.off)) as usize;
        match insn.code & 0xf0 {
            BPF_EXIT => vec![],
            BPF_CALL => vec![(t + 1, false)],
            BPF_JA if class == BPF_JMP => vec![(target, true)],
            _ => vec![(t + 1, true), (target, true)],
        }
    }

    /// The edges of `t` in the order the kernel follows them (fall-through
    /// first), reversed for popping.
    fn next_edges(insns: &[Insn], t: usize) -> Vec<(usize, bool)> {
        let mut out = edges(insns, t);
        out.reverse();
        out
    }

    /// Every loop closed by a fall-through, as (from, to), found by the
    /// kernel's depth-first walk.
    fn fallthrough_back_edges(insns: &[Insn]) -> Vec<(usize, usize)> {
        let mut mark = vec![Mark::Unseen; insns.len() + 1];
        let mut bad = Vec::new();
        let mut stack: Vec<(usize, Vec<(usize, bool)>)> = vec![(0, next_edges(insns, 0))];
        mark[0] = Mark::OnPath;
        while let Some((t, pending)) = stack.last_mut() {
            let t = *t;
            let Some((w, loop_ok)) = pending.pop() else {
                mark[t] = Mark::Done;
                stack.pop();
                continue;
            };
            if w >= insns.len() {
                continue;
            }
            match mark[w] {
                Mark::Unseen => {
                    mark[w] = Mark::OnPath;
                    stack.push((w, next_edges(insns, w)));
                }
                Mark::OnPath if !loop_ok => bad.push((t, w)),
                _ => {}
            }
        }
        bad
    }

    #[test]
    fn every_loop_of_every_program_closes_with_a_jump() {
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        let mut checked = 0;
        for function in object.functions.values() {
            let insns: Vec<Insn> = function
                .instructions
                .iter()
                .map(|i| Insn {
                    code: i.code,
                    off: i.off,
                })
                .collect();
            let bad = fallthrough_back_edges(&insns);
            assert!(
                bad.is_empty(),
                "{}: loops closed by a fall-through at {bad:?} (instruction indexes); \
                 kernels before 6.4 refuse the program",
                function.name
            );
            checked += 1;
        }
        assert!(checked >= 2, "the programs were found");
    }

    #[test]
    fn no_forwarding_program_calls_a_subprogram() {
        use forwarder_common::maps::programs;
        const BPF_PSEUDO_CALL: u8 = 1;
        // kernel_log is the exception: its own frame is small, and aya-log
        // writes a record in subprograms of its own.
        let forwarding: Vec<&str> = [programs::UPLINK_INGRESS, programs::DOWNSTREAM_INGRESS]
            .into_iter()
            .chain(programs::RELAY_UP_STAGES)
            .collect();
        let object = aya_obj::Object::parse(EBPF_OBJECT).unwrap();
        let mut programs = 0;
        for function in object.functions.values() {
            if !forwarding.contains(&function.name.as_str()) {
                continue;
            }
            programs += 1;
            let calls = function
                .instructions
                .iter()
                .filter(|i| i.code == BPF_JMP | BPF_CALL && i.src_reg() == BPF_PSEUDO_CALL)
                .count();
            assert_eq!(
                calls, 0,
                "{} calls {calls} subprograms (a memset or memcpy the compiler chose?); \
                 kernels before 5.13 add their stack to its own",
                function.name
            );
        }
        assert_eq!(programs, 4, "the four forwarding programs were found");
    }

    #[test]
    fn the_check_sees_a_fallthrough_loop() {
        let insn = |code: u8, off: i16| Insn { code, off };
        // 0: if .. goto 2; 1: exit; 2: mov; 3: if .. goto 5; 4: ja -3 (back
        // to 2: a jump closes the loop); 5: exit.
        let good = [
            insn(BPF_JMP | 0x10, 1),
            insn(BPF_JMP | BPF_EXIT, 0),
            insn(0x07, 0),
            insn(BPF_JMP | 0x10, 1),
            insn(BPF_JMP | BPF_JA, -3),
            insn(BPF_JMP | BPF_EXIT, 0),
        ];
        assert!(fallthrough_back_edges(&good).is_empty());
        // 0: ja +2 (to 3, the head); 1: mov; 2: mov, falls into 3; 3: if
        // .. goto 1 (back into the body); 4: exit. The loop 1-2-3-1 is
        // closed by 2 falling into 3, which is on the path.
        let bad = [
            insn(BPF_JMP | BPF_JA, 2),
            insn(0x07, 0),
            insn(0x07, 0),
            insn(BPF_JMP | 0x10, -3),
            insn(BPF_JMP | BPF_EXIT, 0),
        ];
        assert_eq!(fallthrough_back_edges(&bad), [(2, 3)]);
    }
}
