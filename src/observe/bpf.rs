//! Classic BPF socket filters: a small assembler with absolute jump targets, and attaching a
//! program to a socket. Used by the route event socket ([`super::kernel::event_program`]) and
//! the nf_tables sentinels ([`crate::nftables::responder`]).

use nix::libc::{self, BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET};
pub use nix::libc::{BPF_B, BPF_H, BPF_W};

/// An instruction; jumps are to absolute indexes, made relative by [`assemble`].
pub enum Insn {
    /// `ld` of size `BPF_B`, `BPF_H` or `BPF_W` at an offset into the packet.
    Ld(u32, u32),
    /// Compare with a constant: to the first index if equal, else to the second.
    Jeq(u32, usize, usize),
    /// Keep this many bytes (0: drop).
    Ret(u32),
}

/// `ld` of a half word reads network byte order, and netlink headers are in host order: the
/// value to compare with is the same bytes read big-endian.
pub fn be16(v: u16) -> u32 {
    u32::from(u16::from_be_bytes(v.to_ne_bytes()))
}

/// As [`be16`], for a word.
pub fn be32(v: u32) -> u32 {
    u32::from_be_bytes(v.to_ne_bytes())
}

pub fn assemble(code: &[Insn]) -> Vec<libc::sock_filter> {
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    code.iter()
        .enumerate()
        .map(|(at, i)| match *i {
            Insn::Ld(size, offset) => op(BPF_LD | size | BPF_ABS, 0, 0, offset),
            Insn::Jeq(k, t, f) => op(
                BPF_JMP | BPF_JEQ | BPF_K,
                (t - at - 1) as u8,
                (f - at - 1) as u8,
                k,
            ),
            Insn::Ret(k) => op(BPF_RET | BPF_K, 0, 0, k),
        })
        .collect()
}

/// Attaches (or replaces: the kernel swaps programs atomically) a socket filter.
pub fn attach(
    sock: std::os::fd::BorrowedFd<'_>,
    code: &[libc::sock_filter],
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `code`, both alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
