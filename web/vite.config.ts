// No React plugin: esbuild compiles the JSX (tsconfig's "react-jsx"), which keeps the install
// small and working with npm 10 as well as 11 (see README, "Web client").
import { defineConfig } from "vite";

// `npm run dev` proxies the API to a running `peernet serve` (PEERNET_URL, default :8000).
const target = process.env.PEERNET_URL ?? "http://127.0.0.1:8000";

export default defineConfig({
  build: {
    outDir: "dist",
    emptyOutDir: true,
    chunkSizeWarningLimit: 600,
    rollupOptions: {
      // Motion marks its modules "use client" for server components; meaningless in a bundle.
      onwarn(warning, warn) {
        if (warning.code !== "MODULE_LEVEL_DIRECTIVE") warn(warning);
      },
    },
  },
  server: {
    proxy: { "/v1": { target, ws: true }, "/healthz": target },
  },
});
