//! The virtual machine: guest RAM, one KVM VM with one memory slot (dirty logging on), one vCPU
//! in real mode with a 4 GiB data-segment limit ("unreal mode"), and the thread that runs it.
//!
//! The guest is [`GUEST_CODE`], 34 bytes at guest address 0: it keeps a 64-bit counter in
//! `EDX:EBX`, adds one before every store, and stores it into the first 8 bytes of page after
//! page from `EBP` (4 KiB) up to `ESI` (the end of RAM), then starts over at `EBP`. So at any
//! moment every data page holds the counter value of its last store, the page just before `EDI`
//! holds the current counter, and all other pages hold smaller values.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Boxed error of this crate.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// Guest page size (x86).
pub const PAGE: u64 = 4096;
/// Guest address of [`GUEST_CODE`].
pub const CODE_GPA: u64 = 0;
/// First page the guest writes its counter to.
pub const DATA_START: u64 = PAGE;
/// Largest guest: RAM ends below the x86 interrupt-controller window (I/O APIC at
/// `0xFEC0_0000`, local APIC at `0xFEE0_0000`). KVM here turns guest stores to `0xFEE0_0000`
/// into MMIO exits even inside a memory slot, without an in-kernel irqchip and with the APIC
/// disabled in `apic_base` (seen with a 4095 MiB guest); a PC keeps that window out of RAM.
pub const MAX_RAM: u64 = 0xFEC0_0000;
/// KVM memory slot of guest RAM.
const SLOT: u32 = 0;

/// The guest, 16-bit code (operand- and address-size prefixes for 32-bit registers and
/// addresses; the data segments' 4 GiB limit lets `[EDI]` reach all of RAM):
///
/// ```text
/// 00 66 83 C3 01           loop: add  ebx, 1
/// 04 66 83 D2 00                 adc  edx, 0
/// 08 67 66 89 1F                 mov  [edi], ebx
/// 0C 67 66 89 57 04              mov  [edi+4], edx
/// 11 66 81 C7 00 10 00 00        add  edi, 0x1000
/// 18 66 39 F7                    cmp  edi, esi
/// 1B 72 E3                       jb   loop
/// 1D 66 89 EF                    mov  edi, ebp
/// 20 EB DE                       jmp  loop
/// ```
pub const GUEST_CODE: [u8; 34] = [
    0x66, 0x83, 0xC3, 0x01, // add ebx, 1
    0x66, 0x83, 0xD2, 0x00, // adc edx, 0
    0x67, 0x66, 0x89, 0x1F, // mov [edi], ebx
    0x67, 0x66, 0x89, 0x57, 0x04, // mov [edi+4], edx
    0x66, 0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, // add edi, 0x1000
    0x66, 0x39, 0xF7, // cmp edi, esi
    0x72, 0xE3, // jb loop
    0x66, 0x89, 0xEF, // mov edi, ebp
    0xEB, 0xDE, // jmp loop
];

/// Guest RAM: a mapping of this process that the VM's memory slot points to.
pub struct GuestRam {
    ptr: *mut u8,
    len: usize,
    /// Keeps the mapping alive (anonymous memory, or a snapshot's private mapping).
    _owner: Box<dyn Send>,
}

// SAFETY: `GuestRam` owns its mapping (through `_owner`, which is `Send`); the raw pointer is
// only an address into it, and all access goes through `&self`/`&mut self` methods whose
// rules are documented on them.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// Fresh anonymous zero memory (`vm-memory`'s `MmapRegion`, `MAP_PRIVATE|MAP_NORESERVE`).
    pub fn anonymous(len: usize) -> Result<Self, Error> {
        let region = vm_memory::MmapRegion::<()>::new(len)?;
        let ptr = region.as_ptr();
        // SAFETY: `ptr .. ptr + len` is the region's own mapping, which it keeps until dropped;
        // the region is moved into the result and nothing else refers to it.
        Ok(unsafe { Self::from_owner(Box::new(region), ptr, len) })
    }

    /// Guest RAM kept alive by `owner`.
    ///
    /// # Safety
    ///
    /// `ptr .. ptr + len` must be readable and writable memory that stays mapped as long as
    /// `owner` lives, and that nothing but the returned value (and, once it is registered with a
    /// VM, that VM's vCPUs) reads or writes.
    pub unsafe fn from_owner(owner: Box<dyn Send>, ptr: *mut u8, len: usize) -> Self {
        Self {
            ptr,
            len,
            _owner: owner,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, writable: only possible before the memory is handed to a [`Machine`] (which
    /// takes it by value), so no vCPU can write it meanwhile.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` readable, writable bytes owned by `self` (see
        // `from_owner`); `&mut self` excludes every other access, and a `GuestRam` that is not
        // inside a `Machine` is attached to no vCPU.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Start address, for `KVM_SET_USER_MEMORY_REGION` and for volatile readers. Valid as long
    /// as `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

/// The vCPU's registers: the VMM's "device state".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VcpuState {
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
}

const STATE_FORMAT: &str = "mapped-ram-kvm-vmm/vcpu-state/1";

impl VcpuState {
    /// The guest's 64-bit counter (`EDX:EBX`).
    pub fn counter(&self) -> u64 {
        ((self.regs.rdx & 0xffff_ffff) << 32) | (self.regs.rbx & 0xffff_ffff)
    }

    /// The address of the next page the guest will write (`EDI`).
    pub fn next_page_addr(&self) -> u64 {
        self.regs.rdi & 0xffff_ffff
    }

    /// Serialized (JSON, with a format tag).
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let v = serde_json::json!({
            "format": STATE_FORMAT,
            "regs": serde_json::to_value(self.regs)?,
            "sregs": serde_json::to_value(self.sregs)?,
        });
        Ok(serde_json::to_vec(&v)?)
    }

    /// Parses [`VcpuState::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("device state is not this VMM's vCPU state: {e}"))?;
        if v["format"] != STATE_FORMAT {
            return Err(format!(
                "device state has format {}, not {STATE_FORMAT}",
                v["format"]
            )
            .into());
        }
        Ok(Self {
            regs: serde_json::from_value(v["regs"].clone())?,
            sregs: serde_json::from_value(v["sregs"].clone())?,
        })
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while it runs a vCPU (null otherwise).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Runs on the vCPU thread. Inside KVM_RUN the pending signal alone makes it return EINTR;
    // between the stop-flag check and KVM_RUN, `immediate_exit` makes the next KVM_RUN return
    // at once instead of running the guest.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer is this thread's `kvm_run.immediate_exit`, set by `run_vcpu` while
        // it owns the `VcpuFd` whose `kvm_run` mapping holds it, and cleared before that
        // `VcpuFd` leaves the thread; a byte store to it is what KVM's API asks for.
        unsafe { p.write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), Error> {
    // SAFETY: a zeroed `sigaction` is a valid value (empty mask, no flags) that we fill in.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = kick_handler;
    act.sa_sigaction = handler as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is a valid, initialised sigaction whose handler only touches a const
    // thread-local and one byte (async-signal safe); replacing SIGUSR1's disposition affects
    // nothing else in this program.
    let rc = unsafe { libc::sigaction(KICK_SIGNAL, &act, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!("sigaction: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// Whether KVM can create a VM here, and why not.
pub fn kvm_unavailable() -> Option<String> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return Some(format!("cannot open /dev/kvm: {e}")),
    };
    match kvm.create_vm() {
        Ok(_) => None,
        Err(e) => Some(format!("KVM_CREATE_VM failed: {e}")),
    }
}

enum Vcpu {
    Idle(VcpuFd),
    Running {
        thread: JoinHandle<Result<VcpuFd, String>>,
        stop: Arc<AtomicBool>,
    },
    Lost,
}

/// A VM with its RAM and one vCPU. Fields drop in order: the vCPU (stopped first), the VM,
/// then the RAM its memory slot points to.
pub struct Machine {
    vcpu: Mutex<Vcpu>,
    vm: VmFd,
    _kvm: Kvm,
    ram: GuestRam,
}

/// When a started vCPU thread first entered `KVM_RUN`.
pub type FirstRun = Arc<std::sync::OnceLock<Instant>>;

impl Machine {
    /// Creates the VM, registers `ram` at guest address 0 with dirty logging, creates the vCPU.
    pub fn new(ram: GuestRam) -> Result<Self, Error> {
        if ram.len() as u64 > MAX_RAM
            || ram.len() as u64 % PAGE != 0
            || ram.len() < 2 * PAGE as usize
        {
            return Err(format!(
                "guest RAM of {} bytes: need whole pages, at least 2, at most {MAX_RAM} bytes",
                ram.len()
            )
            .into());
        }
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        let region = kvm_userspace_memory_region {
            slot: SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: ram.len() as u64,
            userspace_addr: ram.as_ptr() as u64,
        };
        // SAFETY: the region is `ram`'s mapping, which `Machine` owns and drops only after the
        // VM (field order), so it stays mapped as long as the slot exists; the guest may write
        // it at any time, which `GuestRam`'s accessors allow for (no `&[u8]` of it while a
        // vCPU runs).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        Ok(Self {
            vcpu: Mutex::new(Vcpu::Idle(vcpu)),
            vm,
            _kvm: kvm,
            ram,
        })
    }

    /// The registers the guest starts with: real mode, code at [`CODE_GPA`], data segments
    /// with a 4 GiB limit, counter 0, first store at [`DATA_START`].
    pub fn initial_state(&self) -> Result<VcpuState, Error> {
        let mut state = self.state()?;
        let s = &mut state.sregs;
        s.cs.base = 0;
        s.cs.selector = 0;
        for seg in [&mut s.ds, &mut s.es] {
            seg.base = 0;
            seg.selector = 0;
            seg.limit = 0xffff_ffff;
            seg.g = 1;
            seg.type_ = 3; // data, read/write, accessed
            seg.present = 1;
            seg.s = 1;
            seg.db = 0;
            seg.unusable = 0;
        }
        state.regs = kvm_regs {
            rflags: 2,
            rip: CODE_GPA,
            rdi: DATA_START,
            rbp: DATA_START,
            rsi: self.ram.len() as u64,
            ..Default::default()
        };
        Ok(state)
    }

    fn lock(&self) -> MutexGuard<'_, Vcpu> {
        self.vcpu.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_idle<T>(&self, f: impl FnOnce(&VcpuFd) -> Result<T, Error>) -> Result<T, Error> {
        match &*self.lock() {
            Vcpu::Idle(v) => f(v),
            _ => Err("the vCPU is running (or was lost)".into()),
        }
    }

    /// The vCPU's registers (vCPU stopped).
    pub fn state(&self) -> Result<VcpuState, Error> {
        self.with_idle(|v| {
            Ok(VcpuState {
                regs: v.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?,
                sregs: v.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?,
            })
        })
    }

    /// Sets the vCPU's registers (vCPU stopped).
    pub fn set_state(&self, state: &VcpuState) -> Result<(), Error> {
        self.with_idle(|v| {
            v.set_sregs(&state.sregs)
                .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
            v.set_regs(&state.regs)
                .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
            Ok(())
        })
    }

    /// Fetches and clears the dirty log of guest RAM (KVM's layout: bit `k % 64` of word
    /// `k / 64` is page `k`).
    pub fn dirty_log(&self) -> Result<Vec<u64>, Error> {
        self.vm
            .get_dirty_log(SLOT, self.ram.len())
            .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}").into())
    }

    /// Guest RAM, for readers that cope with a running guest (volatile loads).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM as bytes, while the vCPU is stopped (the borrow keeps it stopped).
    pub fn ram_stopped(&self) -> Result<&[u8], Error> {
        self.with_idle(|_| Ok(()))?;
        // SAFETY: the mapping is `len` readable bytes owned by `self.ram`; the only writer is
        // the vCPU, which is stopped and cannot be started again while `&self` is borrowed
        // (`start` takes `&mut self`); our own code never writes RAM inside a `Machine`.
        Ok(unsafe { std::slice::from_raw_parts(self.ram.ptr, self.ram.len) })
    }

    /// Starts the vCPU on its own thread; returns when it first entered `KVM_RUN`, recorded.
    pub fn start(&mut self) -> Result<FirstRun, Error> {
        let slot = self.vcpu.get_mut().unwrap_or_else(|p| p.into_inner());
        let Vcpu::Idle(vcpu) = std::mem::replace(slot, Vcpu::Lost) else {
            return Err("the vCPU is not idle".into());
        };
        let stop = Arc::new(AtomicBool::new(false));
        let first: FirstRun = Arc::default();
        let thread = {
            let (stop, first) = (Arc::clone(&stop), Arc::clone(&first));
            std::thread::Builder::new()
                .name("vcpu0".into())
                .spawn(move || run_vcpu(vcpu, &stop, &first))?
        };
        *slot = Vcpu::Running { thread, stop };
        Ok(first)
    }

    /// Stops the vCPU: sets the stop flag and kicks the thread out of `KVM_RUN` with
    /// [`KICK_SIGNAL`] until it has returned the vCPU.
    /// Takes `&self` so that a live save can keep borrowing the RAM across the stop.
    pub fn stop(&self) -> Result<(), Error> {
        let mut slot = self.lock();
        let Vcpu::Running { thread, stop } = std::mem::replace(&mut *slot, Vcpu::Lost) else {
            return Err("the vCPU is not running".into());
        };
        stop.store(true, Ordering::SeqCst);
        use std::os::unix::thread::JoinHandleExt;
        while !thread.is_finished() {
            // SAFETY: the thread has not been joined, so its pthread_t is valid; the signal's
            // handler is installed (`Machine::new`) and only sets `immediate_exit`.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), KICK_SIGNAL) };
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        let vcpu = thread
            .join()
            .map_err(|_| "the vCPU thread panicked")?
            .map_err(|e| format!("vCPU: {e}"))?;
        *slot = Vcpu::Idle(vcpu);
        Ok(())
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if matches!(*self.lock(), Vcpu::Running { .. }) {
            let _ = self.stop();
        }
    }
}

fn run_vcpu(mut vcpu: VcpuFd, stop: &AtomicBool, first: &FirstRun) -> Result<VcpuFd, String> {
    let flag: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(flag));
    let mut result = Ok(());
    while !stop.load(Ordering::SeqCst) {
        first.get_or_init(Instant::now);
        match vcpu.run() {
            Ok(VcpuExit::Intr) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Ok(exit) => {
                result = Err(format!("unexpected vCPU exit {exit:?}"));
                break;
            }
            Err(e) => {
                result = Err(format!("KVM_RUN: {e}"));
                break;
            }
        }
    }
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    vcpu.set_kvm_immediate_exit(0);
    result.map(|()| vcpu)
}
