/* HiGHS' deferred C++ static initialisers (docs/performance.md, "Start-up").
 *
 * The devmap binary is linked with crates/devmap-cli/highs-init.ld, which moves the .init_array
 * entries of HiGHS' objects into their own section and defines these two bounds; the C library
 * then skips them at start-up. Every other program linking devmap-solver (test binaries, the
 * Python extension) has no such section: the weak references resolve to null, there is nothing to
 * run, and HiGHS was initialised by the C library as usual. (Default visibility, not hidden: a
 * hidden undefined weak symbol cannot be referenced PC-relative from a shared object.) */
#include <stddef.h>

typedef void (*devmap_init_fn)(void);

extern const devmap_init_fn __devmap_highs_init_start[] __attribute__((weak));
extern const devmap_init_fn __devmap_highs_init_end[] __attribute__((weak));

/* Runs the deferred initialisers in link order, as the C library would have, and returns how many
 * ran. The entries are the compilers' `_GLOBAL__sub_I_*` functions, which take no arguments. The
 * caller runs this once (a std::sync::Once in src/highs_init.rs). */
size_t devmap_run_deferred_highs_init(void) {
    const devmap_init_fn *start = __devmap_highs_init_start;
    const devmap_init_fn *end = __devmap_highs_init_end;
    if (start == NULL || end == NULL) {
        return 0;
    }
    size_t count = 0;
    for (const devmap_init_fn *f = start; f < end; ++f) {
        /* glibc skips null and -1 entries in .init_array too. */
        if (*f != NULL && *f != (devmap_init_fn)-1) {
            (*f)();
            ++count;
        }
    }
    return count;
}
